import sys

from mobiletune.assets import main

sys.exit(main())
