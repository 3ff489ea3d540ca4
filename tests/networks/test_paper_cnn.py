import pytest
import torch

from robustmri.networks import PaperCNN


@pytest.mark.parametrize("size, padding, feature_dim", [(256, 0, 1024), (128, 2, 1024), (64, 2, 256)])
def test_paper_cnn_shapes(size, padding, feature_dim):
    net = PaperCNN(spatial_size=size, padding=padding).eval()
    x = torch.rand(2, 1, size, size)
    features = net.features(x)
    assert features.shape == (2, feature_dim) and net.feature_dim == feature_dim
    assert isinstance(net.classifier, torch.nn.Linear) and net.classifier.in_features == feature_dim
    torch.testing.assert_close(net(x), net.classifier(features))
    assert net(x).shape == (2, 3)


def test_paper_cnn_layout():
    net = PaperCNN(spatial_size=256)
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 32, 64, 64, 64]
    assert all(c.kernel_size == (5, 5) for c in convs)
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules()) == 5
    assert sum(isinstance(m, torch.nn.MaxPool2d) for m in net.modules()) == 5


def test_too_small_input_is_a_clear_error():
    with pytest.raises(ValueError, match="too small"):
        PaperCNN(spatial_size=128, padding=0)
