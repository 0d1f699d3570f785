"""Batched density-peak clustering against a plain per-image reference written with explicit loops."""

from __future__ import annotations

import math

import pytest
import torch

from transformers_setok.clustering import density_peak_clustering, pairwise_distances


def reference_clustering(
    x: torch.Tensor, k: int, threshold: float, min_tokens: int = 1, max_tokens: int | None = None
) -> dict:
    """DPC-KNN on one image, one patch at a time (Rodriguez & Laio; ties go to the lower patch index)."""
    n, d = x.shape
    dist = [[float(((x[i] - x[j]) ** 2).sum().sqrt()) / math.sqrt(d) for j in range(n)] for i in range(n)]
    density = [math.exp(-sum(v**2 for v in sorted(dist[i])[:k]) / k) for i in range(n)]
    delta = []
    for i in range(n):
        denser = [j for j in range(n) if density[j] > density[i] or (density[j] == density[i] and j < i)]
        delta.append(min(dist[i][j] for j in denser) if denser else max(dist[i]))
    score = [density[i] * delta[i] for i in range(n)]
    passing = sum(s > threshold for s in score)
    upper = n if max_tokens is None else min(max_tokens, n)
    count = min(max(passing, min_tokens), upper)
    ranked = sorted(range(n), key=lambda i: (-score[i], i))
    centers = sorted(ranked[:count])
    assignment = [min(range(count), key=lambda c: (dist[i][centers[c]], c)) for i in range(n)]
    for c, patch in enumerate(centers):
        assignment[patch] = c
    return {"centers": centers, "assignment": assignment, "density": density, "delta": delta, "scores": score}


def assert_matches_reference(result, image: int, x: torch.Tensor, **settings) -> None:
    ref = reference_clustering(x, **settings)
    n = x.shape[0]
    count = len(ref["centers"])
    assert int(result.num_tokens[image]) == count
    assert result.centers[image, :count].tolist() == ref["centers"]
    assert result.assignment[image, :n].tolist() == ref["assignment"]
    for field in ("density", "delta", "scores"):
        torch.testing.assert_close(
            getattr(result, field)[image, :n], torch.tensor(ref[field], dtype=x.dtype), rtol=1e-9, atol=1e-12
        )


def blobs(num_blobs: int, per_blob: int, dim: int, spread: float, generator: torch.Generator) -> torch.Tensor:
    centers = torch.randn(num_blobs, dim, generator=generator, dtype=torch.float64) * 4
    noise = torch.randn(num_blobs, per_blob, dim, generator=generator, dtype=torch.float64) * spread
    return (centers[:, None] + noise).reshape(num_blobs * per_blob, dim)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("threshold", [0.0, 0.2, 0.6])
def test_random_features_match_reference(seed: int, threshold: float) -> None:
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(3, 30, 8, generator=generator, dtype=torch.float64)
    result = density_peak_clustering(features, k=4, threshold=threshold)
    for image in range(3):
        assert_matches_reference(result, image, features[image], k=4, threshold=threshold)


def test_structured_features_find_their_blobs() -> None:
    generator = torch.Generator().manual_seed(0)
    features = blobs(num_blobs=4, per_blob=10, dim=6, spread=0.05, generator=generator)
    result = density_peak_clustering(features[None], k=5, threshold=0.5)
    assert_matches_reference(result, 0, features, k=5, threshold=0.5)
    assert int(result.num_tokens[0]) == 4
    labels = result.assignment[0].view(4, 10)
    assert (labels == labels[:, :1]).all(), "every blob is one cluster"
    assert labels[:, 0].unique().numel() == 4, "different blobs are different clusters"


def test_exact_ties_from_duplicated_features() -> None:
    generator = torch.Generator().manual_seed(3)
    distinct = torch.randn(5, 8, generator=generator, dtype=torch.float64)
    features = distinct[torch.tensor([0, 1, 0, 2, 3, 1, 4, 4, 2, 0, 3, 1, 4, 0, 2, 3])]
    for threshold in (0.0, 0.3, 10.0):
        result = density_peak_clustering(features[None], k=3, threshold=threshold, min_tokens=2)
        assert_matches_reference(result, 0, features, k=3, threshold=threshold, min_tokens=2)
    again = density_peak_clustering(features[None], k=3, threshold=0.0, min_tokens=2)
    first = density_peak_clustering(features[None], k=3, threshold=0.0, min_tokens=2)
    assert torch.equal(again.assignment, first.assignment)
    assert torch.equal(again.centers, first.centers)
    # with every patch a centre, the first copy of each duplicate wins the tie
    all_centers = density_peak_clustering(features[None], k=3, threshold=0.0, min_tokens=16)
    assert all_centers.assignment[0].tolist() == list(range(16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_duplicated_rows_get_identical_distance_rows(dtype: torch.dtype) -> None:
    """Equal features must see bitwise-equal distances wherever they sit in the batch, or ties are not ties."""
    generator = torch.Generator().manual_seed(11)
    distinct = torch.randn(2, 23, 96, generator=generator, dtype=dtype) * 3 + 1
    pick = torch.randint(0, 23, (2, 301), generator=generator)
    features = torch.stack([distinct[b, pick[b]] for b in range(2)])
    distances = pairwise_distances(features)
    for b in range(2):
        for source in range(23):
            rows = distances[b, pick[b] == source]
            assert (rows == rows[:1]).all()
            assert (rows[:, pick[b] == source] == 0).all()


def test_distances_match_elementwise_cdist_and_do_not_depend_on_the_batch() -> None:
    generator = torch.Generator().manual_seed(12)
    features = torch.randn(4, 200, 64, generator=generator) * 2 + 0.5
    distances = pairwise_distances(features)
    exact = torch.cdist(features.double(), features.double(), compute_mode="donot_use_mm_for_euclid_dist") / 8
    torch.testing.assert_close(distances.double(), exact, rtol=1e-6, atol=1e-6)
    assert torch.equal(distances, distances.transpose(1, 2))
    assert (distances.diagonal(dim1=1, dim2=2) == 0).all()
    for image in range(4):
        assert torch.equal(pairwise_distances(features[image : image + 1])[0], distances[image])


def test_identical_features_give_one_token() -> None:
    features = torch.ones(1, 25, 4)
    result = density_peak_clustering(features, k=5, threshold=0.0)
    assert result.num_tokens.tolist() == [1]
    assert result.centers.tolist() == [[0]]
    assert (result.assignment == 0).all()


def test_densest_patch_takes_its_own_largest_distance() -> None:
    """Rodriguez & Laio: the global density peak's delta is its own farthest distance, so it is always a centre."""
    generator = torch.Generator().manual_seed(5)
    features = blobs(num_blobs=2, per_blob=12, dim=4, spread=0.3, generator=generator)[None]
    result = density_peak_clustering(features, k=4, threshold=0.0)
    peak = int(result.density[0].argmax())
    distances = torch.cdist(features[0], features[0]) / 2.0
    torch.testing.assert_close(result.delta[0, peak], distances[peak].max())
    high = float(result.scores[0].max()) * 0.999
    assert peak in density_peak_clustering(features, k=4, threshold=high).centers[0].tolist()


def test_padded_batch_equals_images_alone() -> None:
    generator = torch.Generator().manual_seed(7)
    sizes = [30, 18, 25]
    images = [torch.randn(n, 8, generator=generator) for n in sizes]
    padded = torch.zeros(3, 30, 8)
    valid = torch.zeros(3, 30, dtype=torch.bool)
    for i, image in enumerate(images):
        padded[i, : len(image)] = image
        valid[i, : len(image)] = True
    batched = density_peak_clustering(padded, k=4, threshold=0.3, valid_mask=valid)
    for i, image in enumerate(images):
        alone = density_peak_clustering(image[None], k=4, threshold=0.3)
        n, count = len(image), int(alone.num_tokens[0])
        assert int(batched.num_tokens[i]) == count
        assert torch.equal(batched.assignment[i, :n], alone.assignment[0])
        assert torch.equal(batched.centers[i, :count], alone.centers[0, :count])
        assert torch.equal(batched.scores[i, :n], alone.scores[0])
        assert (batched.assignment[i, n:] == -1).all()
        assert not batched.center_mask[i, count:].any()
        assert (batched.centers[i, count:] == -1).all()


def test_padded_images_match_reference() -> None:
    generator = torch.Generator().manual_seed(8)
    features = torch.randn(2, 20, 6, generator=generator, dtype=torch.float64)
    valid = torch.ones(2, 20, dtype=torch.bool)
    valid[1, 13:] = False
    result = density_peak_clustering(features, k=3, threshold=0.2, valid_mask=valid)
    assert_matches_reference(result, 0, features[0], k=3, threshold=0.2)
    assert_matches_reference(result, 1, features[1, :13], k=3, threshold=0.2)


@pytest.mark.parametrize("padding_value", [0.0, 1e3])
def test_padding_content_and_budgets_beyond_an_image_never_change_its_clusters(padding_value: float) -> None:
    """Padding is nobody's farthest patch, and budgets cap at each image's own valid count.

    The short image is nearly flat (all its distances well below 1), so no constant standing in for padding can
    pass for one of its distances.
    """
    generator = torch.Generator().manual_seed(10)
    features = torch.full((2, 20, 6), padding_value, dtype=torch.float64)
    features[0] = torch.randn(20, 6, generator=generator, dtype=torch.float64)
    features[1, :6] = 0.05 * torch.randn(6, 6, generator=generator, dtype=torch.float64)
    valid = torch.ones(2, 20, dtype=torch.bool)
    valid[1, 6:] = False
    for settings in (dict(threshold=0.2), dict(threshold=0.2, min_tokens=10), dict(threshold=0.0, max_tokens=8)):
        result = density_peak_clustering(features, k=3, valid_mask=valid, **settings)
        assert_matches_reference(result, 0, features[0], k=3, **settings)
        assert_matches_reference(result, 1, features[1, :6], k=3, **settings)


def test_budget_bounds_and_threshold_monotonicity() -> None:
    generator = torch.Generator().manual_seed(9)
    features = torch.randn(4, 40, 8, generator=generator)
    counts = []
    for threshold in (0.0, 0.1, 0.2, 0.3, 0.4, 0.6, 1.0, 5.0):
        result = density_peak_clustering(features, k=5, threshold=threshold)
        counts.append(result.num_tokens)
        bounded = density_peak_clustering(features, k=5, threshold=threshold, min_tokens=3, max_tokens=7)
        assert ((bounded.num_tokens >= 3) & (bounded.num_tokens <= 7)).all()
        assert torch.equal(bounded.num_tokens, result.num_tokens.clamp(3, 7))
        assert torch.equal(bounded.center_mask.sum(-1), bounded.num_tokens)
        assert int(bounded.assignment.max()) < 7
    for higher, lower in zip(counts[1:], counts[:-1]):
        assert (higher <= lower).all(), "a higher threshold never gives more tokens"
    assert counts[0].tolist() == [40] * 4 and counts[-1].tolist() == [1] * 4


def test_max_tokens_keeps_the_best_scoring_centres() -> None:
    generator = torch.Generator().manual_seed(10)
    features = torch.randn(1, 30, 8, generator=generator, dtype=torch.float64)
    result = density_peak_clustering(features, k=4, threshold=0.0, max_tokens=5)
    assert_matches_reference(result, 0, features[0], k=4, threshold=0.0, max_tokens=5)
    best = result.scores[0].topk(5).indices.sort().values
    assert result.centers[0].tolist() == best.tolist()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(features=torch.randn(10, 4), k=2, threshold=0.5), "features must be"),
        (dict(features=torch.randn(0, 10, 4), k=2, threshold=0.5), "at least one image"),
        (dict(features=torch.randn(1, 10, 4), k=11, threshold=0.5), "k must be between"),
        (dict(features=torch.randn(1, 10, 4), k=0, threshold=0.5), "k must be between"),
        (dict(features=torch.randn(1, 10, 4), k=2, threshold=-0.1), "threshold must be >= 0"),
        (dict(features=torch.randn(1, 10, 4), k=2, threshold=float("nan")), "threshold must be >= 0"),
        (dict(features=torch.randn(1, 10, 4), k=2, threshold=0.5, min_tokens=0), "min_tokens"),
        (dict(features=torch.randn(1, 10, 4), k=2, threshold=0.5, min_tokens=5, max_tokens=2), "max_tokens"),
        (dict(features=torch.randn(1, 10, 4), k=2, threshold=0.5, valid_mask=torch.ones(1, 9)), "valid_mask"),
        (dict(features=torch.randn(2, 10, 4), k=4, threshold=0.5, valid_mask=torch.arange(10).expand(2, 10) < 3), "k"),
    ],
)
def test_bad_input_is_named(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        density_peak_clustering(**kwargs)
