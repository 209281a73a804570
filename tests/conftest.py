import os
import shutil

# Without a GPU, Triton's interpreter runs the fused kernels (geolinrpe.ops.fused) on the CPU;
# it must be chosen before triton is first imported.
if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# The suite's tensors are tiny: one intra-op thread is fastest and avoids oversubscribing
# the 2-core CI machine.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
