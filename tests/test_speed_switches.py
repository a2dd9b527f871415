"""The speed switches' own guarantees (model.memory_format, model.compilation); the equivalence
and causality tests run with each switch on too (helpers.SPEED_SWITCHES)."""

import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from model.compilation import compile_blocks, eager, repeated_blocks
from model.memory_format import channels_last_share, use_channels_last

from helpers import repo_env, tiny_tokenizer, video


def conv_inputs_in_channels_last(model: nn.Module, *inputs) -> list[bool]:
    """Per conv call: was its input channels-last when the conv ran (after every hook)?"""
    seen = []

    def record(module, args):
        fmt = torch.channels_last_3d if isinstance(module, nn.Conv3d) else torch.channels_last
        seen.append(args[0].is_contiguous(memory_format=fmt))

    handles = [
        m.register_forward_pre_hook(record)
        for m in model.modules()
        if isinstance(m, nn.Conv3d | nn.Conv2d)
    ]
    with torch.no_grad():
        model(*inputs)
    for handle in handles:
        handle.remove()
    return seen


def test_channels_last_reaches_every_convolution_and_comes_off_again():
    model = tiny_tokenizer(separate_first_frame_encoding=True).eval()  # Conv3d and Conv2d
    x = video(frames=9)
    assert not all(conv_inputs_in_channels_last(model, x))
    handles = use_channels_last(model)
    assert all(conv_inputs_in_channels_last(model, x))
    # Most convs get it from the conv before them, not from a copy.
    assert channels_last_share(model.encoder, x)["conv3d"] > 0.5
    for handle in handles:
        handle.remove()
    assert not all(conv_inputs_in_channels_last(model, x))


def test_channels_last_switches_each_kind_separately():
    model = tiny_tokenizer(separate_first_frame_encoding=True).eval()
    use_channels_last(model, conv3d=False, conv2d=True)
    calls = {"conv3d": [], "conv2d": []}
    for m in model.modules():
        if isinstance(m, nn.Conv3d | nn.Conv2d):
            kind = "conv3d" if isinstance(m, nn.Conv3d) else "conv2d"
            m.register_forward_pre_hook(
                lambda mod, args, kind=kind: calls[kind].append(
                    args[0].is_contiguous(memory_format=torch.channels_last)
                    or args[0].is_contiguous(memory_format=torch.channels_last_3d)
                )
            )
    with torch.no_grad():
        model(video(frames=9))
    assert all(calls["conv2d"]) and calls["conv2d"]
    assert not any(calls["conv3d"][:1])  # the stem sees the plain video


def test_the_rgb_discriminator_stage_trains_in_channels_last():
    """oneDNN's strided 1x1 weight gradient of a channels-last input with fewer channels than
    its block writes out of bounds (oneDNN issue 6035): the discriminator's residual runs it as
    a stride-1 conv of every other pixel. In a subprocess, so that a crash is a failure."""
    code = textwrap.dedent(
        """
        import torch
        from model.discriminator import DiscriminatorBlock
        block = DiscriminatorBlock(3, 64, downsample=True, antialiased=True)
        x = torch.randn(4, 3, 32, 32).to(memory_format=torch.channels_last).requires_grad_()
        block.to(memory_format=torch.channels_last)
        out = block(x)
        (grad,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
        grad.square().sum().backward()
        print("ok", out.shape[-1])
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env=repo_env(), capture_output=True, text=True
    )
    assert result.returncode == 0 and "ok 16" in result.stdout, result.stderr[-2000:]


def test_the_strided_residual_equals_a_stride_2_conv():
    from model.discriminator import DiscriminatorBlock

    torch.manual_seed(0)
    block = DiscriminatorBlock(8, 16, downsample=True, antialiased=False)
    x = torch.randn(2, 8, 16, 16)
    strided = nn.functional.conv2d(x, block.conv_res.weight, block.conv_res.bias, stride=2)
    assert torch.allclose(block.conv_res(x[:, :, ::2, ::2]), strided, atol=1e-6)


def test_compile_blocks_finds_the_repeated_blocks():
    model = tiny_tokenizer(use_gan=True)  # the facade: tokenizer and image discriminator
    stages = list(model.discr.stages)
    assert len(stages) > 1
    blocks = repeated_blocks(model)
    assert blocks == [*model.encoder.layers, *model.decoder.layers, *stages]
    with pytest.raises(ValueError, match="compile mode"):
        compile_blocks(model, mode="reduce-overhead")


@pytest.mark.slow
def test_compiled_discriminator_takes_the_penalty_only_eagerly():
    """AOTAutograd has no double backward: the gradient penalty through compiled stages fails,
    and inside `eager()` it equals the plain model's."""
    plain = tiny_tokenizer(use_gan=True).discr
    compiled = tiny_tokenizer(use_gan=True).discr  # the same seed: the same weights
    compile_blocks(compiled)
    images = torch.randn(4, 3, 16, 16, requires_grad=True)

    def penalty(critic):
        logits = critic(images)
        (grad,) = torch.autograd.grad(logits.sum(), images, create_graph=True)
        return grad.square().sum()

    expected = penalty(plain)
    (expected_grad,) = torch.autograd.grad(expected, plain.to_logits.weight)
    with pytest.raises(RuntimeError):  # the message varies with the torch version
        torch.autograd.grad(penalty(compiled), compiled.to_logits.weight)
    with eager():
        value = penalty(compiled)
        (grad,) = torch.autograd.grad(value, compiled.to_logits.weight)
    assert torch.allclose(value, expected) and torch.allclose(grad, expected_grad)
