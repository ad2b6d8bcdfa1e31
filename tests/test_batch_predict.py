"""Batch prediction to JSON lines: order, ids, bounded streaming, per-batch flushes, resuming."""

import json
import shutil
import tracemalloc

import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from serving_models import save_bundle, write_pngs

import trainfer
from trainfer.cli import main
from trainfer.serve import batch_predict
from trainfer.serve.batch_predict import (
    count_records,
    iter_images,
    keep_records,
    predict_to_jsonl,
    producer_path,
    producer_record,
)

LABELS = ["cat", "dog", "owl"]


@pytest.fixture(scope="module")
def predictor(tmp_path_factory):
    bundle = save_bundle(tmp_path_factory.mktemp("bundle") / "b", 0, labels=LABELS, preprocess={"mean": [0.5]})
    return trainfer.Predictor.load(bundle, batch_size=8)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """45 PNGs: 40 at the top, 5 in a sub-directory, plus a file that is not an image."""
    root = tmp_path_factory.mktemp("images")
    write_pngs(root, 40)
    write_pngs(root / "more", 5, seed=1)
    (root / "notes.txt").write_text("not an image")
    return root


# The CSV resume test saves a bare nn.Linear; bundles may name it once it is registered.
trainfer.register_model(torch.nn.Linear, name="torch.nn:Linear")


def expected_lines(predictor, root, top_k=None) -> list[str]:
    ids = [key for key, _ in iter_images(root)]
    results = predictor.predict([str(root / key) for key in ids], top_k=top_k)
    return [json.dumps({"id": key, **result.to_record()}) + "\n" for key, result in zip(ids, results, strict=True)]


class Spy:
    """A predictor wrapper recording every batch it is asked for and the output file's state then."""

    def __init__(self, predictor, out=None):
        self.predictor, self.out = predictor, out
        self.model, self.heads, self.threshold = predictor.model, predictor.heads, predictor.threshold  # its digest
        self.batch_size = predictor.batch_size
        self.preprocess_spec = predictor.preprocess_spec
        self.calls: list[tuple[int, int]] = []  # (inputs asked for, records already in the file)

    def predict(self, inputs, top_k=None):
        flushed = len(self.out.read_text().splitlines()) if self.out and self.out.exists() else 0
        self.calls.append((len(inputs), flushed))
        return self.predictor.predict(inputs, top_k=top_k)


def test_images_are_predicted_in_sorted_order_with_relative_ids(predictor, images, tmp_path):
    out = tmp_path / "preds.jsonl"
    summary = predict_to_jsonl(predictor, images, out, top_k=2, progress=False)
    lines = out.read_text().splitlines(keepends=True)
    assert lines == expected_lines(predictor, images, top_k=2)
    assert [json.loads(line)["id"] for line in lines][-6:] == [
        "img00039.png",
        *(f"more/img0000{i}.png" for i in range(5)),
    ]
    assert (summary.resumed, summary.written) == (0, 45)


def test_csv_rows_are_predicted_by_row_index_with_named_columns(tmp_path):
    linear = torch.nn.Linear(2, 1).double()
    predictor = trainfer.Predictor(linear, task="regression", preprocess={"columns": ["c", "a"], "dtype": "float64"})
    rows = [(i, 0.5 * i, -i / 3) for i in range(50)]
    source = tmp_path / "table.csv"
    source.write_text("a,b,c\n" + "".join(f"{a},{b},{c!r}\n" for a, b, c in rows))
    predict_to_jsonl(predictor, source, tmp_path / "out.jsonl", progress=False)
    records = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    with torch.no_grad():
        reference = linear(torch.tensor([[c, a] for a, _, c in rows], dtype=torch.float64)).flatten().tolist()
    assert [r["id"] for r in records] == [f"{source}:{i}" for i in range(50)]
    assert [r["values"][0] for r in records] == pytest.approx(reference, rel=1e-12)


def test_streaming_holds_one_batch_and_flushes_each_before_the_next(predictor, tmp_path):
    out = tmp_path / "preds.jsonl"
    pulled = []

    def source():  # 2,000 inputs: a fully materialised list would show as pulled >> written
        for index in range(2000):
            pulled.append(index)
            yield index, torch.full((1, 8, 8), index / 2000)

    class Recording(Spy):
        def predict(self, inputs, top_k=None):
            results = super().predict(inputs, top_k)
            assert len(pulled) - self.calls[-1][1] <= self.batch_size  # read ahead: this batch only
            return results

    recording = Recording(predictor, out)
    predict_to_jsonl(recording, source(), out, progress=False)
    assert [flushed for _, flushed in recording.calls] == list(range(0, 2000, 8))
    assert len(out.read_text().splitlines()) == 2000


def test_resume_skips_written_records_and_redoes_a_truncated_last_line(predictor, images, tmp_path):
    full = tmp_path / "full.jsonl"
    predict_to_jsonl(predictor, images, full, progress=False)
    lines = full.read_text().splitlines(keepends=True)
    crashed = tmp_path / "crashed.jsonl"
    crashed.write_text("".join(lines[:13]) + lines[13][:25])  # a crash in the middle of record 14
    shutil.copy(producer_path(full), producer_path(crashed))

    spy = Spy(predictor)
    summary = predict_to_jsonl(spy, images, crashed, progress=False)
    assert crashed.read_bytes() == full.read_bytes()
    assert (summary.resumed, summary.written) == (8, 37)  # back to the last whole batch of 8: same batches
    assert [count for count, _ in spy.calls] == [8, 8, 8, 8, 5]  # the first batch is not predicted again

    again = predict_to_jsonl(spy, images, crashed, progress=False)  # done: only the last partial batch is redone
    assert (again.resumed, again.written) == (40, 5) and crashed.read_bytes() == full.read_bytes()


def test_records_are_counted_and_cut_by_complete_lines(tmp_path):
    out = tmp_path / "o.jsonl"
    records = "".join(f'{{"id": {i}}}\n' for i in range(7))
    out.write_text(records + '{"id": 7')
    assert count_records(out) == 7
    keep_records(out, 6)
    assert out.read_text() == records[: records.index('{"id": 6}')]
    assert count_records(tmp_path / "missing.jsonl") == 0


def test_resume_refuses_an_output_of_other_inputs_or_a_corrupt_line(predictor, images, tmp_path):
    out = tmp_path / "o.jsonl"
    producer_path(out).write_text(json.dumps(producer_record(predictor, None)))  # written by this predictor
    out.write_text('{"id": "img00000.png"}\n{"id": "elsewhere.png"}\n')
    with pytest.raises(ValueError, match=r"line 2 is for 'elsewhere.png', input 2 is 'img00001.png'"):
        predict_to_jsonl(predictor, images, out, progress=False)
    assert out.read_text() == '{"id": "img00000.png"}\n{"id": "elsewhere.png"}\n'  # refused, left untouched
    out.write_text('{"id": "img00000.png"}\nnot json\n{"id": "img00002.png"}\n')
    with pytest.raises(ValueError, match="line 2 is not a prediction record"):
        predict_to_jsonl(predictor, images, out, progress=False)
    out.write_text("".join(f'{{"id": {i}}}\n' for i in range(3)))
    with pytest.raises(ValueError, match="is for 0, input 1 is 'img00000.png'"):
        predict_to_jsonl(predictor, images, out, progress=False)


def test_resume_refuses_a_deeply_nested_record_line_in_one_line_exit_2(tmp_path):
    """Attacker round 10 F4: the out file is untrusted input; a line nested 200,000 deep was parsed by
    ``json.loads``: RecursionError, an internal error (exit 3). Its nesting is bounded as any JSON's."""
    bundle = save_bundle(tmp_path / "b", 0, labels=LABELS)
    write_pngs(tmp_path / "images", 4)
    out = tmp_path / "o.jsonl"
    command = ["predict", str(bundle), str(tmp_path / "images"), "--out", str(out), "--batch-size", "2"]
    assert CliRunner().invoke(main, command).exit_code == 0
    lines = out.read_text().splitlines(keepends=True)
    lines[0] = '{"id": "img00000.png", "x": ' + "[" * 200_000 + "]" * 200_000 + "}\n"
    out.write_text("".join(lines))
    result = CliRunner().invoke(main, command)
    message = (
        "o.jsonl' line 1 is not a prediction record with an 'id': the line is not valid JSON for trainfer: "
        "arrays/objects nest 200001 deep (at most 100 allowed)"
    )
    assert (result.exit_code, result.output.count("\n")) == (2, 1) and message in result.output, result.output


def test_resume_reads_no_line_past_the_record_limit_whole(predictor, images, tmp_path, monkeypatch):
    """An unterminated last line of 300 MB was read whole only to be cut off; a long line among the records
    is refused, read no further than the limit."""
    monkeypatch.setattr(batch_predict, "MAX_RECORD_BYTES", 4096)
    out = tmp_path / "o.jsonl"
    predict_to_jsonl(predictor, images, out, progress=False)
    whole = out.read_bytes()
    with open(out, "ab") as handle:  # a crash mid-write of a huge line, or a forged file
        handle.write(b'{"id": "' + b"a" * 20_000_000)
    tracemalloc.start()
    summary = predict_to_jsonl(predictor, images, out, progress=False)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert out.read_bytes() == whole and summary.resumed == 40 and peak < 10_000_000

    out.write_bytes(b'{"id": "img00000.png", "pad": "' + b"a" * 5000 + b'"}\n' + whole)
    with pytest.raises(ValueError, match=r"o\.jsonl' line 1 is longer than 4096 bytes .*: not a prediction record"):
        predict_to_jsonl(predictor, images, out, progress=False)


def test_a_bad_image_stops_the_run_after_the_batches_before_it(predictor, tmp_path):
    root = tmp_path / "images"
    write_pngs(root, 20)
    (root / "img00010.png").write_bytes(b"not a png")
    out = tmp_path / "o.jsonl"
    with pytest.raises(ValueError, match="cannot read image .*img00010.png"):
        predict_to_jsonl(predictor, root, out, progress=False)
    assert len(out.read_text().splitlines()) == 8  # the first batch was written; resuming redoes the rest


@pytest.mark.parametrize(
    ("source", "out", "error", "message"),
    [
        ("missing", "o.jsonl", FileNotFoundError, "does not exist"),
        ("notes.txt", "o.jsonl", ValueError, "neither a directory of images nor a .csv"),
        (".", "no/such/dir/o.jsonl", FileNotFoundError, "--out directory .* does not exist"),
    ],
)
def test_bad_sources_and_outputs_are_named(predictor, tmp_path, source, out, error, message):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(error, match=message):
        predict_to_jsonl(predictor, tmp_path / source, tmp_path / out, progress=False)


def test_an_ensemble_streams_to_jsonl_with_members_and_spread(predictor, images, tmp_path):
    other = trainfer.Predictor.load(save_bundle(tmp_path / "b2", 1, labels=LABELS), batch_size=8)
    ensemble = trainfer.Predictor.ensemble([predictor, other])
    out = tmp_path / "o.jsonl"
    predict_to_jsonl(ensemble, images, out, progress=False)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    paths = [str(images / record["id"]) for record in records]
    assert records == [{"id": r["id"], **result.to_record()} for r, result in zip(records, ensemble.predict(paths))]
    assert {r["members"] for r in records} == {2} and all(r["spread"] >= 0 for r in records)


def test_cli_out_streams_files_and_explains_them(predictor, tmp_path):
    bundle = save_bundle(tmp_path / "b", 0, labels=LABELS, preprocess={"mean": [0.5]})
    paths = [str(p) for p in write_pngs(tmp_path / "images", 2)]
    out, explained = tmp_path / "o.jsonl", tmp_path / "explained"
    args = ["predict", str(bundle), *paths, "--out", str(out), "--explain", str(explained)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert records == [{"id": path, **r.to_record()} for path, r in zip(paths, predictor.predict(paths), strict=True)]
    assert sorted(p.name for p in explained.iterdir()) == ["000_img00000.png", "001_img00001.png"]


def test_cli_explain_keeps_every_explanation_it_made_and_exits_1_naming_each_it_could_not(tmp_path, monkeypatch):
    """Attacker round 7: one example failing its completeness check ended the run with no PNG kept."""
    from trainfer.analysis import attribution_files
    from trainfer.errors import ExplanationError, ExplanationWarning

    bundle = save_bundle(tmp_path / "b", 0, labels=LABELS, preprocess={"mean": [0.5]})
    paths = [str(p) for p in write_pngs(tmp_path / "images", 3)]
    explain_batch, calls = attribution_files.explain_batch, []

    second: list[torch.Tensor] = []  # the second example, as the first call (all three examples) holds it

    def failing_second(predictor, batch, *args, **options):
        calls.append(len(batch))
        if not second:
            second.append(batch[1].clone())
        failing = [i for i, example in enumerate(batch) if torch.equal(example, second[0])]
        if failing:
            raise ExplanationError(
                "integrated gradients failed its completeness check for example(s) ", failing, ": why"
            )
        return explain_batch(predictor, batch, *args, **options)

    monkeypatch.setattr(attribution_files, "explain_batch", failing_second)
    out, explained = tmp_path / "o.jsonl", tmp_path / "explained"
    said = r"example 1 \(001_img00001.png\) not explained: .* completeness check for example\(s\) \[1\]: why"
    with pytest.warns(ExplanationWarning, match=said):  # one line on the command line; numbered as the run counts
        result = CliRunner().invoke(
            main, ["predict", str(bundle), *paths, "--out", str(out), "--explain", str(explained)]
        )
    assert result.exit_code == 1, result.output
    # the three together, then each alone to find the one that fails; predictions kept
    assert calls == [3, 1, 1, 1] and len(out.read_text().splitlines()) == 3
    assert sorted(p.name for p in explained.iterdir()) == ["000_img00000.png", "002_img00002.png"]
    lines = result.output.strip().splitlines()
    assert lines[-1] == (
        "error: 1 of 3 examples could not be explained (each named above): 1 (001_img00001.png); "
        f"the 2 others are written in {str(explained)!r}"
    )


def test_cli_out_resumes_a_csv(tmp_path):
    linear = torch.nn.Linear(2, 1)
    bundle = trainfer.save(
        linear,
        tmp_path / "b",
        factory="torch.nn:Linear",
        config={"in_features": 2, "out_features": 1},
        task="regression",
        preprocess={"columns": ["a", "b"]},
    )
    source = tmp_path / "t.csv"
    source.write_text("a,b\n" + "".join(f"{i},{-i}\n" for i in range(10)))
    out = tmp_path / "o.jsonl"
    args = ["predict", str(bundle), str(source), "--out", str(out), "--batch-size", "4"]
    assert CliRunner().invoke(main, args).exit_code == 0
    full = out.read_text()
    out.write_text(full[: full.index(f'"{source}:5"') + 3])
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0 and out.read_text() == full
    assert "6 records written" in result.output and "after 4 already there" in result.output
    assert "(1 found after the last whole batch of 4 were predicted again" in result.output
    finished = CliRunner().invoke(main, args)  # a rerun of a finished file redoes its partial last batch, saying so
    assert finished.exit_code == 0 and out.read_text() == full
    assert "2 records written" in finished.output and "after 8 already there (2 found after" in finished.output


def test_a_file_begun_on_one_form_and_device_is_not_resumed_on_another(tmp_path, monkeypatch):
    """A file begun on the CPU, served by the bundle's runtime.json, and resumed with --device cuda mixed in the
    answers of the PyTorch model on the GPU: the record names what served on which device, and a resume that would
    change either is refused, the file untouched. CUDA is simulated: the device is picked, nothing moves."""
    from trainfer.serve import predictor as predictor_module
    from trainfer.serve import runtime_record, served_model

    bundle = save_bundle(tmp_path / "b", 0, labels=LABELS, preprocess={"mean": [0.5]})
    runtime_record.save_record(bundle, trainfer.compile(bundle, runtime="torch").record)
    paths = [str(p) for p in write_pngs(tmp_path / "images", 3)]
    out = tmp_path / "o.jsonl"
    args = ["predict", str(bundle), *paths, "--out", str(out), "--batch-size", "2"]
    assert CliRunner().invoke(main, args).exit_code == 0
    lines = out.read_text().splitlines(keepends=True)
    out.write_text(lines[0])  # as a crash leaves it
    recorded = json.loads(producer_path(out).read_text())
    assert (recorded["forms"], recorded["devices"]) == (["torch/float32"], ["cpu"])
    with monkeypatch.context() as cuda_machine:  # "cuda" is picked (the PyTorch model serves there); nothing runs
        cuda_machine.setattr(served_model, "_names_another_device", lambda overrides: overrides["device"] == "cuda")
        cuda_machine.setattr(served_model, "pick_device", lambda name: torch.device("cpu"))
        cuda_machine.setattr(predictor_module, "pick_device", lambda name: torch.device(name))
        cuda_machine.setattr(predictor_module, "placed", lambda model, device: model)
        cuda_machine.setattr(predictor_module.Predictor, "_check_heads", lambda *arguments, **options: None)
        result = CliRunner().invoke(main, [*args, "--device", "cuda"])
    assert result.exit_code == 2 and len(result.output.splitlines()) == 1, result.output
    begun = "it was written with devices ['cpu'], not ['cuda']; forms ['torch/float32'], not ['the PyTorch model']"
    assert begun in result.output
    assert out.read_text() == lines[0]  # refused, left untouched
    assert CliRunner().invoke(main, [*args, "--device", "cpu"]).exit_code == 0  # the CPU resumes
    assert out.read_text().splitlines(keepends=True) == lines


def test_a_record_written_before_it_named_the_device_resumes_on_the_cpu_only(predictor, images, tmp_path):
    out = tmp_path / "o.jsonl"
    predict_to_jsonl(predictor, images, out, progress=False)
    lines = out.read_text().splitlines(keepends=True)
    earlier = {k: v for k, v in json.loads(producer_path(out).read_text()).items() if k not in ("forms", "devices")}
    out.write_text("".join(lines[:9]))
    producer_path(out).write_text(json.dumps(earlier))  # as an earlier trainfer wrote it
    on_a_gpu = Spy(predictor)
    on_a_gpu.device = torch.device("cuda:0")
    refused = r"its record, from an earlier trainfer, does not say on which device it was begun, and this run serves"
    with pytest.raises(trainfer.InputError, match=refused + r" on cuda: resume it on the CPU \(--device cpu\)"):
        predict_to_jsonl(on_a_gpu, images, out, progress=False)
    assert out.read_text() == "".join(lines[:9])
    predict_to_jsonl(predictor, images, out, progress=False)  # on the CPU: resumed, the record completed
    assert out.read_text().splitlines(keepends=True) == lines
    assert json.loads(producer_path(out).read_text())["devices"] == ["cpu"]


@settings(max_examples=20)
@given(count=st.integers(1, 30), batch_size=st.integers(1, 7), cut=st.floats(0, 1))
def test_resuming_after_a_crash_at_any_byte_gives_the_uninterrupted_file(
    predictor, tmp_path_factory, count, batch_size, cut
):
    samples = torch.rand(count, 1, 8, 8, generator=torch.Generator().manual_seed(count))
    source = [(f"sample-{i}", sample) for i, sample in enumerate(samples)]
    root = tmp_path_factory.mktemp("resume")
    full, crashed = root / "full.jsonl", root / "crashed.jsonl"
    predict_to_jsonl(predictor, source, full, batch_size=batch_size, progress=False)
    data = full.read_bytes()
    crashed.write_bytes(data[: int(cut * len(data))])
    shutil.copy(producer_path(full), producer_path(crashed))
    summary = predict_to_jsonl(predictor, source, crashed, batch_size=batch_size, progress=False)
    assert crashed.read_bytes() == data
    assert summary.resumed % batch_size == 0 and summary.resumed + summary.written == count


def test_cli_predicts_a_directory_to_stdout_with_the_ids_of_out(predictor, images, tmp_path):
    bundle = save_bundle(tmp_path / "b", 0, labels=LABELS, preprocess={"mean": [0.5]})
    result = CliRunner().invoke(main, ["predict", str(bundle), str(images), "--format", "jsonl", "--batch-size", "8"])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines(keepends=True) == expected_lines(predictor, images)
