"""deploy on Hugging Face transformers models built from tiny ``*Config`` objects (optional: skipped
without transformers; ``make test-interop`` runs it in ``.venv-next``). No download.

Text models are called as users call them: ``model(input_ids, attention_mask=...)`` (and
``decoder_input_ids=`` for encoder-decoders), so deploy gets ``example_kwargs``. Every result must
keep its ``ModelOutput`` type (``out.logits`` works); common checks in ``tests/interop.py``.
"""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from interop import bench, deploy_checked  # noqa: E402 - only once transformers is known to be there

TEXT = ["bert", "distilbert", "t5", "bart", "wav2vec2_ctc"]
VISION = ["vit", "convnext", "resnet", "mobilevit"]


@pytest.mark.parametrize("name", TEXT + VISION)
def test_models_deploy_exactly_and_keep_their_model_output(name):
    row = deploy_checked(name)
    assert row.batch_norms[1] == 0, row


def test_the_deployed_output_is_a_model_output_with_logits():
    import trainfer

    case = bench.build("bert")
    deployed = trainfer.deploy(case.model, case.args, example_kwargs=case.kwargs)
    out = deployed(*case.args, **case.kwargs)
    assert type(out).__name__ == "SequenceClassifierOutput"
    assert out.logits.shape == (1, 2)


def test_the_key_value_cache_of_an_encoder_decoder_is_compared_tensor_by_tensor():
    """With the cache on (the default), T5 returns a ``Cache`` object, a plain object verify looks
    into: its key and value tensors are compared, not the object's identity."""
    import copy

    from time_limit import time_limit

    import trainfer

    case = bench.build("t5")
    with time_limit(300):
        eq = trainfer.verify(case.model, copy.deepcopy(case.model), case.args, example_kwargs=case.kwargs)
    cached = [e for e in eq.outputs if e.path.endswith((".keys", ".values"))]
    assert eq.ok, eq
    assert len(cached) >= 8 and all(e.compared > 0 for e in cached), eq
