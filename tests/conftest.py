import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    no_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(no_gpu)


@pytest.fixture(scope="session")
def vgg_weights(tmp_path_factory):
    """A torchvision VGG16 state dict with random weights (no pretrained weights offline)."""
    import torchvision

    path = tmp_path_factory.mktemp("vgg") / "vgg16-random.pth"
    torch.manual_seed(0)
    torch.save(torchvision.models.vgg16(weights=None).state_dict(), path)
    return str(path)
