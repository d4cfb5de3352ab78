import sys

from penaltyd.cli import main

sys.exit(main())
