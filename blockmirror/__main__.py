import sys

from blockmirror.cli import main

sys.exit(main())
