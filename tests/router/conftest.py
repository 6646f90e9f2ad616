import pytest
import torch


@pytest.fixture(autouse=True)
def one_torch_thread():
    """The router's MLPs are tiny: one thread avoids oversubscription on small CI machines."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
