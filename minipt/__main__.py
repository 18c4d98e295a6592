import sys

from .apps.cli import main  # the one module of the method that imports apps: it is the program

sys.exit(main())
