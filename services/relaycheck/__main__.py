import sys

from relaycheck.cli import main

sys.exit(main())
