"""What `minitron demo` launches under torchrun: `python -m megatron_minitron.demo CONFIG_JSON [--no-plots]`."""

import json
import sys

from megatron_minitron.cli.demo import run_ranks
from megatron_minitron.demo.config import DemoConfig

if __name__ == "__main__":
    sys.exit(run_ranks(DemoConfig.from_json(json.loads(sys.argv[1])), plots="--no-plots" not in sys.argv[2:]))
