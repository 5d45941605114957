import sys

from kernelkit.run import main

if __name__ == "__main__":
    sys.exit(main())
