"""Two nodes on one machine: two `torchrun --nnodes 2 --nproc_per_node 1` processes meeting at a
c10d rendezvous on 127.0.0.1 (gloo), exactly as docs/scaling-out.md tells a user to start one
per machine. The dump equals the one-process dump bit for bit; the student takes the same
optimizer steps over the same rows as one process with the same global batch."""

import json
import socket
import subprocess
import sys
import uuid

import pytest
import zarr

from helpers import TRAIN_ROWS, with_changes, write_params_file
from pipeline.store.dump import dump_logits
from pipeline.train.loop import load_checkpoint


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def two_nodes(*args):
    """Run `args` (a script and its options) as two torchrun nodes of one process each; both
    must succeed. The command is docs/scaling-out.md's recipe with 127.0.0.1 as the host."""
    endpoint, job = f"127.0.0.1:{free_port()}", uuid.uuid4().hex[:8]
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
               "--nproc_per_node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint,
               "--rdzv-id", job, *map(str, args)]
    nodes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outputs = [node.communicate(timeout=300) for node in nodes]
    for node, (out, err) in zip(nodes, outputs):
        assert node.returncode == 0, out[-4000:] + err[-4000:]
    return [out for out, _ in outputs]


def read_store(path):
    group = zarr.open_group(str(path), mode="r")
    arrays = {name: array[...] for name, array in group.arrays()}
    arrays.update({f"class_prior/{name}": array[...]
                   for name, array in group["class_prior"].arrays()})
    return arrays, dict(group.attrs)


@pytest.fixture(scope="module")
def single_process_store(stage_one_data, teacher_checkpoint, tmp_path_factory):
    path = tmp_path_factory.mktemp("one_node") / "single.zarr"
    dump_logits(stage_one_data.params, "teacher", str(stage_one_data.shards_dir),
                str(teacher_checkpoint), str(path))
    return path


def test_two_node_dump_equals_the_single_process_dump(stage_one_data, teacher_checkpoint,
                                                      single_process_store, tmp_path):
    data = stage_one_data
    params_file = write_params_file(tmp_path / "params.yaml", data.raw)
    out = tmp_path / "two_nodes.zarr"
    outputs = two_nodes("stages/dump_logits.py", "--params", params_file, "--name", "teacher",
                        "--shards", data.shards_dir, "--checkpoint", teacher_checkpoint,
                        "--out", out)
    assert sum(f"{out}: complete" in text for text in outputs) == 2  # each node's rank
    (found, found_attrs), (expected, expected_attrs) = (read_store(out),
                                                        read_store(single_process_store))
    assert found_attrs == expected_attrs and found_attrs["complete"]
    assert set(found) == set(expected) and "tail_residuals" in found
    for name, values in expected.items():
        assert found[name].dtype == values.dtype and found[name].tobytes() == values.tobytes(), name


def test_two_node_student_takes_the_steps_of_one_process(stage_one_data, teacher_checkpoint,
                                                         single_process_store, tmp_path):
    """Global batch 8: one process takes 8 + 8 + 8 + 2 rows an epoch; two nodes take 4 + 4 +
    4 + 1 each, the same 4 steps over the same 26 rows, and the same scheduler steps."""
    data = stage_one_data
    raw = with_changes(data.raw, "student", batch_size=8, drop_last=False, epochs=2)
    params_file = write_params_file(tmp_path / "params.yaml", raw)

    def student(name, records):
        records.mkdir()
        return ["tests/record_training_rows.py", records, "stages/train_student.py",
                "--params", params_file, "--shards", data.shards_dir, "--store",
                single_process_store, "--teacher-checkpoint", teacher_checkpoint,
                "--out", tmp_path / name, "--live", tmp_path / f"{name}_live"]

    one = subprocess.run([sys.executable, *map(str, student("one", tmp_path / "one_rows"))],
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-4000:]
    two_nodes(*student("two", tmp_path / "two_rows"))
    one_record = json.loads((tmp_path / "one_rows" / "rank0.json").read_text())
    two_records = [json.loads((tmp_path / "two_rows" / f"rank{rank}.json").read_text())
                   for rank in (0, 1)]
    assert one_record["steps_per_epoch"] == 4
    assert [r["steps_per_epoch"] for r in two_records] == [4, 4]
    for epoch in range(2):
        one_steps = one_record["epochs"][epoch]
        node_steps = [record["epochs"][epoch] for record in two_records]
        assert [len(step) for step in one_steps] == [8, 8, 8, 2]
        assert [[len(step) for step in steps] for steps in node_steps] == [[4, 4, 4, 1]] * 2
        one_rows = sorted(row for step in one_steps for row in step)
        two_rows = sorted(row for steps in node_steps for step in steps for row in step)
        assert one_rows == two_rows == list(range(TRAIN_ROWS))
    one_state = load_checkpoint(tmp_path / "one" / "checkpoint.pt")
    two_state = load_checkpoint(tmp_path / "two" / "checkpoint.pt")
    assert one_state["epoch"] == two_state["epoch"] == 1
    assert one_state["scheduler"]["last_epoch"] == two_state["scheduler"]["last_epoch"] == 8
