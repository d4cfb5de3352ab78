"""relaycheck: tells a customer's own mail from spam relayed through its open relay (issue 5)."""
