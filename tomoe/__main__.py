import sys

from tomoe.cli import main

sys.exit(main())
