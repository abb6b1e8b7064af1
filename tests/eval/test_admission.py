"""The admission job's decode length: every request still decodes when the last prompt is in."""

from vllm_duo.eval.admission import decode_tokens


def test_decode_outlasts_the_prefill_of_every_other_request() -> None:
    # 25 requests of 64K at 16K tokens per step: the last prompt is in after ~100 steps
    assert decode_tokens(25, 65536, 16384) == 100 + 8
    assert decode_tokens(1, 1000, 16384) == 1 + 8
    # more requests, or a smaller step budget, need longer decodes
    assert decode_tokens(12, 65536, 8192) > decode_tokens(12, 65536, 16384)
