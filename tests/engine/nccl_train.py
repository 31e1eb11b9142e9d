"""train.py under the simulated NCCL device rule (nccl_rule.py). Lightning starts the other DDP ranks by
running `sys.argv[0]` again, so train.py is executed here (not through runpy, which would point argv[0] at
it) and every rank checks. The rule's log folder comes from $VITQ_NCCL_RULE_LOG."""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import nccl_rule  # noqa: E402

nccl_rule.install(os.environ["VITQ_NCCL_RULE_LOG"])
TRAIN = Path(__file__).resolve().parents[2] / "train.py"
exec(compile(TRAIN.read_text(), str(TRAIN), "exec"), {"__name__": "__main__", "__file__": str(TRAIN)})
