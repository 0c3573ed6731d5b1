import logging
import pathlib
import sys
import warnings

sys.path.insert(0, str(pathlib.Path(__file__).parent))  # tests/_models.py (import mode is importlib)

# bitsandbytes and torchao log about optional kernels they cannot load on this machine.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
logging.getLogger("torchao").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", module="torchao")
