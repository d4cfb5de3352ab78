"""What runs beside a smart relay for relaycheck: `relaycheck-milter`
(`relaycheckclient.milter`), which asks relaycheck's Classify at end of headers."""
