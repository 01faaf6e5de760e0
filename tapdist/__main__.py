import sys

from tapdist.cli import main

sys.exit(main())
