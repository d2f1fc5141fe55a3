import sys

from mobiletune.cli import main

sys.exit(main())
