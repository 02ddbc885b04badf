import torch

from entrotheory import entropy


def test_uniform_entropy_is_log_k():
    assert torch.allclose(entropy(torch.zeros(5)), torch.log(torch.tensor(5.0)))
