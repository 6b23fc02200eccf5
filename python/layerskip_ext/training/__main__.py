"""``python -m layerskip_ext.training {train,analyze} ...`` (what ``torchrun -m layerskip_ext.training train ...``
runs): the same commands as ``layerskip train`` / ``layerskip analyze``."""
import sys

from ..cli import main

if __name__ == "__main__":
    sys.exit(main())
