"""Fuzz parse_idx: any bytes give a uint8 tensor of the payload, or MNISTDataError, in small memory.

A bad header may claim sizes up to 0xFFFFFFFF per dimension; parse_idx must
compare them with the bytes present before allocating, so every call here
allocates no more than a small multiple of its input (traced by tracemalloc,
not timed: a clock is flaky on a busy machine). Any other exception
(ValueError, RuntimeError, MemoryError) is a bug.
"""
import random
import struct
import tracemalloc

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fastmnist.data import FILES, IDX_UBYTE, MNISTDataError, parse_idx

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
HUGE = [0, 1, 2, 28, 255, 256, 60000, 2**16, 2**31 - 1, 2**31, 2**32 - 1]
NAME = "fuzz.idx"


def header(shape, type_byte=IDX_UBYTE, rank=None):
    rank = len(shape) if rank is None else rank
    return bytes([0, 0, type_byte, rank]) + b"".join(struct.pack(">I", n) for n in shape)


# The headers of the four real MNIST files, as FILES records their shapes.
REAL_HEADERS = [header(shape) for _, shape in FILES.values()]


# Inputs here are at most ~1.3 KB; a parser that sized a buffer from a hostile header would
# allocate megabytes to gigabytes. (tracemalloc sees Python buffers such as bytearray, which
# parse_idx copies the payload into; the returned tensor's size is checked separately below.)
MAX_TRACED_BYTES = 1 << 20


def parse_or_reject(data: bytes):
    """parse_idx's result, or None when it raised MNISTDataError; asserts the contract either way."""
    tracemalloc.start()
    try:
        out = parse_idx(data, NAME)
    except MNISTDataError as exc:
        assert NAME in str(exc)
        out = None
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < MAX_TRACED_BYTES, f"parse_idx allocated {peak} bytes for {len(data)} bytes of input"
    if out is not None:
        rank = data[3]
        payload = data[4 + 4 * rank :]
        assert out.dtype == torch.uint8
        assert out.numel() == len(payload)
        assert tuple(out.shape) == struct.unpack(f">{rank}I", data[4 : 4 + 4 * rank])
        assert bytes(out.flatten().tolist()) == payload
    return out


@FUZZ
@given(shape=st.lists(st.integers(1, 9), min_size=1, max_size=4), seed=st.integers(0, 2**32 - 1))
def test_well_formed_files_parse_to_their_shape(shape, seed):
    payload = random.Random(seed).randbytes(torch.Size(shape).numel())
    out = parse_or_reject(header(shape) + payload)
    assert out is not None and tuple(out.shape) == tuple(shape)


@FUZZ
@given(which=st.sampled_from(REAL_HEADERS), cut=st.integers(0, 15), extra=st.binary(max_size=64))
def test_truncated_real_headers_are_rejected(which, cut, extra):
    data = which[: min(cut, len(which))]
    assert parse_or_reject(data) is None
    # A complete real header with only a scrap of its 10,000+ images or labels.
    assert parse_or_reject(which + extra) is None


@FUZZ
@given(shape=st.lists(st.sampled_from(HUGE) | st.integers(0, 2**32 - 1), min_size=1, max_size=4),
       payload=st.binary(max_size=256))
@example(shape=[2**32 - 1] * 4, payload=b"")
@example(shape=[2**32 - 1, 2**32 - 1, 2**32 - 1, 2**32 - 1], payload=b"\xff" * 16)
@example(shape=[2**16, 2**16], payload=b"")
def test_huge_dimensions_are_rejected_before_allocating(shape, payload):
    parse_or_reject(header(shape) + payload)


@FUZZ
@given(shape=st.lists(st.integers(0, 6), min_size=1, max_size=4), surplus=st.binary(min_size=1, max_size=64))
def test_oversized_payloads_are_rejected(shape, surplus):
    payload = bytes(torch.Size(shape).numel())
    assert parse_or_reject(header(shape) + payload + surplus) is None


@FUZZ
@given(type_byte=st.integers(0, 255).filter(lambda t: t != IDX_UBYTE),
       shape=st.lists(st.integers(1, 5), min_size=1, max_size=4), data=st.data())
def test_other_element_types_are_rejected(type_byte, shape, data):
    # 0x09 int8, 0x0B int16, 0x0C int32, 0x0D float32, 0x0E float64, and non-types: only ubyte is MNIST's.
    itemsize = data.draw(st.sampled_from([1, 2, 4, 8]))
    payload = bytes(torch.Size(shape).numel() * itemsize)
    assert parse_or_reject(header(shape, type_byte) + payload) is None


@FUZZ
@given(rank=st.integers(0, 255), dims=st.lists(st.integers(0, 3), max_size=300), payload=st.binary(max_size=32))
def test_any_rank_byte(rank, dims, payload):
    # The header may list as many sizes as the rank byte says, fewer (truncated) or more.
    out = parse_or_reject(header(dims, rank=rank) + payload)
    if rank == 0 or rank > 4:
        assert out is None


@FUZZ
@given(st.binary(max_size=512))
@example(b"")
@example(b"\x00\x00\x08")
@example(b"\x00\x00\x08\x01")
def test_random_bytes(data):
    parse_or_reject(data)


@FUZZ
@given(prefix=st.sampled_from([b"\x00\x00\x08", b"\x00\x00", b"\x00"]), data=st.binary(max_size=64))
def test_random_bytes_after_a_plausible_magic(prefix, data):
    parse_or_reject(prefix + data)


@FUZZ
@given(shape=st.lists(st.sampled_from(HUGE) | st.integers(0, 2**32 - 1), min_size=1, max_size=4)
       .filter(lambda s: 0 in s))
@example(shape=(0,))
@example(shape=(0, 28, 28))
@example(shape=(2**32 - 1, 0))
@example(shape=(0, 2**32 - 1, 2**32 - 1))
def test_a_zero_dimension_is_rejected_as_an_empty_data_set(shape):
    # The header's numel, 0, matches the empty payload, but an empty data set is no MNIST file:
    # one clear rejection, not the errors torch raises for an empty buffer or for strides that
    # overflow int64.
    assert parse_or_reject(header(shape)) is None
    with pytest.raises(MNISTDataError, match="empty data set"):
        parse_idx(header(shape), NAME)
