import pytest


@pytest.fixture
def one_thread():
    """Run a test on one torch thread. These tensors are tiny, so a second OpenMP thread only adds sync cost,
    and when other processes share the two cores its spin-waits make a test ~100× slower."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
