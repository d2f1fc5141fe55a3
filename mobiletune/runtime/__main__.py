import sys

from mobiletune.runtime.cli import main

sys.exit(main())
