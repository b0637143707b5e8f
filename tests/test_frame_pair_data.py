"""The frame-pair example's data (fresh samples, frames as windows into a canvas, the stereo pair), its
classical baselines and the compared models' common fresh head."""

import pytest
import torch

from .test_frame_pair import _one_thread  # noqa: F401 (autouse fixture; it skips without the example's extras)


def test_training_samples_are_fresh_reproducible_and_the_same_for_every_model(monkeypatch):
    from examples.frame_pair import data

    size = (32, 56)
    x1, y1 = data.training_batch(0, 3, 2, 4, 1, size)
    x2, y2 = data.training_batch(0, 3, 2, 4, 2, size)
    again = data.training_batch(0, 3, 2, 4, 2, size)
    assert torch.equal(x2, again[0]) and torch.equal(y2, again[1])  # a function of (seed, step)
    assert torch.equal(x1, x2[:, :3]) and torch.equal(y1, y2)  # slot 1 and target: same for 1 and 2 inputs
    # slot 2 is the reference (frame 0): where the target coordinates fall inside it, slot 1 is the
    # reference seen through them
    inside = (y2[0].abs() < 1 - 2 / torch.tensor(size[::-1]).view(2, 1, 1)).all(0)
    assert inside.float().mean() > 0.5
    torch.testing.assert_close(data.warp(x2[0, 3:], y2[0])[:, inside], x2[0, :3, inside], rtol=0, atol=1e-5)
    assert not torch.allclose(data.warp(x2[0, 3:], data.identity_grid(*size)), x2[0, :3], atol=1e-2)
    other = data.training_batch(0, 4, 2, 4, 2, size)
    assert not torch.equal(x2, other[0]) and not torch.equal(y2, other[1])  # drawn afresh every step
    # the share of each of two processes makes up the batch
    parts = [data.training_batch(0, 3, 2, 4, 2, size, part=(r, 2)) for r in range(2)]
    assert torch.equal(torch.cat([p[0] for p in parts]), x2)
    # training draws only training photos: none of the held-out ones
    seen = []
    real = data._cached
    monkeypatch.setattr(data, "_cached", lambda name, *device: seen.append(name) or real(name, *device))
    for step in range(8):
        data.training_batch(0, step, 2, 4, 2, size)
    assert seen and set(seen) <= set(data.TRAIN_PHOTOS) and not set(data.TRAIN_PHOTOS) & set(data.HELDOUT_PHOTOS)


def test_frames_are_windows_into_a_larger_canvas_and_never_repeat_their_edge():
    """What a motion brings into view is real content of the canvas, not frame 0's edge repeated
    (border streaks that tell even a single frame which way the camera moved)."""
    from examples.frame_pair import data

    size = (36, 64)
    gen = torch.Generator().manual_seed(0)
    canvas = data.augmented_canvas(gen, data.TRAIN_PHOTOS, size)
    assert canvas.shape[-2:] == data.canvas_size(size) == (44, 80)
    frame0 = data.window(canvas, size)
    identity = data.view(canvas, data.identity_grid(*size))  # the identity shows the window
    torch.testing.assert_close(identity, frame0, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="expected 44x80 pixels, got"):
        data.window(canvas[:, 1:], size)
    motion = data.Motion(2, 0.0, 0.0, (-4 * 2 / 64, 0.0), torch.zeros(2, 2, 10, 17), torch.zeros(0, 6))
    coords = motion.coords(1, size)  # the camera moves 4 px left: 4 columns come from outside frame 0
    frame = data.view(canvas, coords)
    shown = canvas[:, 4:40, 4:68]  # the window (rows 4:40, columns 8:72) moved 4 columns left
    torch.testing.assert_close(frame, shown, rtol=0, atol=1e-5)
    streaks = data.warp(frame0, coords)  # negative control: frame 0 sampled with its edge repeated
    torch.testing.assert_close(streaks[:, :, :4], frame0[:, :, :1].expand(-1, -1, 4), rtol=0, atol=1e-5)
    assert not torch.allclose(streaks, shown, rtol=0, atol=1e-3)
    # every drawn motion stays inside the canvas (half a pixel of the 800-pixel canvas to spare)
    ch, cw = data.canvas_size((data.COORD_H, data.COORD_W))
    scale = torch.tensor([data.COORD_W / cw, data.COORD_H / ch]).view(2, 1)
    reach = torch.stack([(data.Motion.draw(gen, 10).coords(9, (45, 80)).flatten(1) * scale).abs().amax(1)
                         for _ in range(200)])
    assert reach.max() < 1 - 1 / cw, reach.max()


def test_compared_models_start_from_the_same_fresh_head():
    """The single-frame model's head is driven to about zero (a saddle for learning the motion), so
    every compared model starts from the same fresh one, drawn from the seed without touching the
    global random state."""
    import copy

    from examples.frame_pair.model import CoordNet
    from examples.frame_pair.pipeline import inflated

    net = CoordNet(pretrained=False)
    assert not net.head.weight.any()  # the single-frame model starts from the identity map
    single, pair = copy.deepcopy(net), inflated(net, 2)
    state = torch.get_rng_state()
    single.new_head(0)
    pair.new_head(0)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(single.head.weight, pair.head.weight) and torch.equal(single.head.bias, pair.head.bias)
    assert single.head.weight.abs().max() > 0.1 and single.head.weight.abs().max() <= 0.25  # 1/sqrt(16)
    other = copy.deepcopy(net)
    other.new_head(1)
    assert not torch.equal(other.head.weight, single.head.weight)
    x = torch.rand(1, 3, 64, 112)
    torch.testing.assert_close(pair(torch.cat([x, torch.rand_like(x)], 1)), single(x.clone()), rtol=0, atol=1e-6)


def test_baselines_turn_flow_into_coordinates_with_the_right_sign():
    from examples.frame_pair import data, evaluate

    motion = data.Motion(2, 0.0, 0.0, (12 * 2 / 640, -8 * 2 / 360), torch.zeros(2, 2, 10, 17), torch.zeros(0, 6))
    video = data.make_video("coffee", 2, 0)
    source, coords = video.image, motion.coords(1)
    frame = data.view(video.canvas, coords)
    identity = evaluate.epe_map(evaluate.baseline("identity", frame, source, (90, 160)), coords)
    assert identity.mean().item() == pytest.approx((12**2 + 8**2) ** 0.5, rel=1e-4)
    inner = (slice(20, -20), slice(20, -20))  # away from the border, where the frame shows what the source lacks
    for name in ("phase_correlation", "tvl1", "ilk"):
        pred = evaluate.baseline(name, frame, source, (90, 160))
        error = evaluate.epe_map(pred, coords)[inner].mean().item()
        assert error < 0.1 * identity.mean().item(), name  # a shift of 14 px, recovered
        flipped = 2 * data.identity_grid(360, 640) - pred  # negative control: the opposite sign
        assert evaluate.epe_map(flipped, coords)[inner].mean().item() > identity.mean().item(), name


def test_precomputed_baselines_equal_direct_calls_and_are_computed_once(monkeypatch):
    """The threaded :func:`precompute` gives each pair exactly what a direct call gives, and a pair
    already computed is not computed again (the figures reuse the scores' pairs)."""
    from examples.frame_pair import data, evaluate

    videos = [data.make_video(name, 3, i) for i, name in enumerate(("coffee", "rocket"))]
    pairs = [(v.frames[t], v.image) for v in videos for t in (1, 2)]
    direct = {(name, i): evaluate.baseline(name, frame, source, (45, 80))
              for name in evaluate.BASELINES for i, (frame, source) in enumerate(pairs)}
    methods = evaluate.methods({}, (48, 80), (45, 80))
    evaluate.precompute(methods, pairs)
    calls = []
    monkeypatch.setattr(evaluate, "baseline", lambda *args: calls.append(args) or data.identity_grid(360, 640))
    for (name, i), expected in direct.items():
        assert torch.equal(methods[name][1]([pairs[i][0]], pairs[i][1]), expected), (name, i)
    assert calls == []
    assert not torch.equal(direct["tvl1", 0], direct["identity", 0])  # the comparison can fail
    again = data.make_video("coffee", 3, 0)  # equal tensors, other objects: computed, not taken for the first
    methods["tvl1"][1]([again.frames[1]], again.image)
    assert len(calls) == 1


def test_stereo_pair_truth_reconstructs_the_left_view():
    from examples.frame_pair import data, evaluate

    pair = data.stereo_pair()
    assert pair.frame.shape == pair.image.shape == (3, 360, 640) and 0.8 < pair.valid.float().mean() < 1
    shift = evaluate.epe_map(data.identity_grid(360, 640), pair.coords)[pair.valid]
    assert 0 < shift.min() and shift.max() <= 60 * 640 / 741 + 1e-3  # disparities scaled with the resize
    true = evaluate.psnr(data.warp(pair.image, pair.coords), pair.frame, pair.valid)
    none = evaluate.psnr(pair.image, pair.frame, pair.valid)
    flipped = torch.stack([2 * data.identity_grid(360, 640)[0] - pair.coords[0], pair.coords[1]])
    assert true > none + 5 and true > evaluate.psnr(data.warp(pair.image, flipped), pair.frame, pair.valid) + 5
