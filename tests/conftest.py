import pytest
import torch

# The suite's tensors are tiny: one intra-op thread is fastest and avoids oversubscribing
# the 2-core CI machine.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
