import io
import tarfile

import pytest
import torch

from tokenflow.data.corpus import iter_shard
from tokenflow.data.manifest import index_shard
from tokenflow.data.shapes import write_shapes_corpus
from tokenflow.train.image_stream import ImageStream
from tokenflow.train.mixture import MixtureSource


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    urls = write_shapes_corpus(str(root), num_samples=48, shard_size=8, seed=0, heldout_fraction=0.0)
    return [index_shard(u) for u in urls["train"]]


def _one(records) -> list[MixtureSource]:
    """A one-corpus mixture."""
    return [MixtureSource("shapes", 1.0, list(records))]


def _drain(stream: ImageStream, batches: int, batch_size: int) -> torch.Tensor:
    return torch.cat([stream.next_batch(batch_size) for _ in range(batches)])


def test_same_seed_same_batches_and_resume_replays_exactly(shards):
    a = ImageStream(_one(shards), rank=0, world_size=1, seed=3, image_size=64)
    full = _drain(a, 10, 8)  # 80 images: crosses an epoch boundary (48 per epoch)
    b = ImageStream(_one(shards), rank=0, world_size=1, seed=3, image_size=64)
    first = _drain(b, 4, 8)
    state = b.state_dict()
    c = ImageStream(_one(shards), rank=0, world_size=1, seed=3, image_size=64)
    c.load_state_dict(state)
    rest = _drain(c, 6, 8)
    assert torch.equal(torch.cat([first, rest]), full)
    assert not torch.equal(_drain(ImageStream(_one(shards), 0, 1, seed=4, image_size=64), 1, 8), full[:8])


def test_workers_split_the_epoch_without_overlap(shards):
    def epoch_keys(rank: int, world: int) -> list[str]:
        stream, keys = ImageStream(_one(shards), rank, world, seed=0, image_size=64).stream, []
        while True:
            _, _, sample = stream.next()
            if stream.sources[0].epoch > 0:
                return keys
            keys.append(sample.key)

    for world in (2, 3, 8):  # 6 shards: by shard for 2 and 3 workers, by sample for 8
        parts = [epoch_keys(r, world) for r in range(world)]
        flat = [k for p in parts for k in p]
        assert len(flat) == len(set(flat)) == 48, world
    assert epoch_keys(0, 2) != epoch_keys(0, 1)[: len(epoch_keys(0, 2))]  # shuffled per epoch


def test_undecodable_sample_is_quarantined_not_fatal(tmp_path, shards):
    tar_path = tmp_path / "bad.tar"
    good = next(iter_shard(shards[0].url))
    with tarfile.open(tar_path, "w") as tar:
        for key, data in (("ok", good.image), ("broken", b"not an image")):
            info = tarfile.TarInfo(f"{key}.png")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    stream = ImageStream(_one([index_shard(str(tar_path))]), 0, 1, seed=0, image_size=64)
    batch = stream.next_batch(3)
    assert batch.shape == (3, 3, 64, 64) and float(batch.min()) >= 0 and float(batch.max()) <= 1
    assert {(q.key, q.reason) for q in stream.quarantined} == {("broken", "undecodable")}


def test_a_stream_over_no_usable_image_raises_instead_of_looping(tmp_path):
    tar_path = tmp_path / "all-bad.tar"
    with tarfile.open(tar_path, "w") as tar:
        for key in ("a", "b", "c"):
            info = tarfile.TarInfo(f"{key}.png")
            info.size = 4
            tar.addfile(info, io.BytesIO(b"oops"))
    stream = ImageStream(_one([index_shard(str(tar_path))]), 0, 1, seed=0, image_size=64)
    with pytest.raises(ValueError, match=r"no training shard of corpus 'shapes' holds a usable image \(1 shards; "
                                         r"3 quarantined here, e.g. \[\('\w', 'undecodable'\)"):
        stream.next_batch(2)


def test_a_worker_whose_share_is_all_bad_goes_on_when_other_shards_are_usable(tmp_path, shards):
    """Two workers, two shards: worker 1's whole share is undecodable, but the corpus is not."""
    bad = tmp_path / "bad.tar"
    with tarfile.open(bad, "w") as tar:
        for key in ("a", "b"):
            info = tarfile.TarInfo(f"{key}.png")
            info.size = 4
            tar.addfile(info, io.BytesIO(b"oops"))
    records = [shards[0], index_shard(str(bad))]
    workers = [ImageStream(_one(records), rank, 2, seed=0, image_size=64) for rank in range(2)]
    for stream in workers:  # every worker meets both shards within two epochs
        assert stream.next_batch(12).shape == (12, 3, 64, 64)


def test_a_mixture_draws_by_weight_and_leaves_the_dropped_duplicates_out(shards):
    first, second = shards[:3], shards[3:]
    dropped_key = next(iter_shard(second[0].url)).key
    sources = [MixtureSource("a", 3.0, first), MixtureSource("b", 1.0, second, {second[0].url: frozenset({dropped_key})})]
    stream = ImageStream(sources, 0, 1, seed=0, image_size=64)
    assert stream.next_batch(40).shape == (40, 3, 64, 64)
    assert stream.stream.counts == {"a": 30, "b": 10}
    seen = {sample.key for _, _, sample in (stream.stream.next() for _ in range(200))}
    assert dropped_key not in seen
