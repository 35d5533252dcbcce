"""Comparing two engines' `RequestOutput` lists: the same tokens, log-probabilities within
a tolerance (for engines whose kernels or graph shapes differ in rounding)."""

from __future__ import annotations


def assert_logprobs_close(got, want, tol: float = 1e-4) -> None:
    for g, w in zip(got, want, strict=True):
        for gc, wc in zip(g.outputs, w.outputs, strict=True):
            for glp, wlp in zip(gc.logprobs or [], wc.logprobs or [], strict=True):
                assert abs(glp.logprob - wlp.logprob) < tol


def assert_same_tokens(got, want, tol: float = 1e-4) -> None:
    """Every completion's token ids equal, and their log-probabilities within `tol`."""
    for g, w in zip(got, want, strict=True):
        for gc, wc in zip(g.outputs, w.outputs, strict=True):
            assert gc.token_ids == wc.token_ids
    assert_logprobs_close(got, want, tol)
