"""The dataset environment: rows to episodes, splits, seeded order and its resume, images, typed errors."""

import base64
import io
import json

import pytest
from PIL import Image

from mmref.client.envs.dataset import DataOrder, DatasetExhaustedError, dataset
from mmref.client.envs.loader import load_environment
from mmref.client.errors import DatasetError, EnvLoadError


def png_bytes(color, size=(20, 10)):
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return buffer.getvalue()


def write(tmp_path, rows, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def data(tmp_path):
    (tmp_path / "img").mkdir()
    for i in range(20):
        (tmp_path / "img" / f"{i}.png").write_bytes(png_bytes((i, 0, 0)))
    return write(tmp_path, [{"images": [f"img/{i}.png", f"img/{(i + 1) % 20}.png"], "q": f"sum {i}?",
                             "answer": str(i), "split": "eval" if i % 5 == 0 else "train"} for i in range(20)])


def ids(source, n):
    return [source.episode(0).row["answer"] for _ in range(n)]


def test_a_row_opens_with_its_images_then_the_prompt_and_images_are_paths_under_the_file_dir(data):
    source = dataset(path=data, prompt="Q: {q}", image_column="images", system_prompt="Be brief.")
    env = source.episode(0)
    system, user = env.reset()
    assert system == {"role": "system", "content": "Be brief."}
    assert [p["type"] for p in user["content"]] == ["image", "image", "text"]
    assert user["content"][2]["text"] == f"Q: sum {env.row['answer']}?"
    assert all((env.image_root / p["image"]).is_file() for p in user["content"][:2])


def test_split_column_and_held_out_fraction_give_disjoint_splits_covering_the_rows(data):
    by_column = dataset(path=data, image_column="images", prompt="{q}", split_column="split")
    assert sorted(by_column.eval) == [0, 5, 10, 15] and len(by_column.train) == 16
    held = dataset(path=data, image_column="images", prompt="{q}", eval_fraction=0.25)
    assert len(held.eval) == 5 and not set(held.eval) & set(held.train)
    assert sorted(held.eval + held.train) == list(range(20))
    # the held-out draw does not move with the run seed: every run evaluates the same rows
    assert dataset(path=data, image_column="images", prompt="{q}", eval_fraction=0.25, seed=9).eval == held.eval
    assert [e.row["answer"] for e in by_column.eval_episodes(2)] == ["0", "5"]


def test_train_order_is_a_seeded_shuffle_each_epoch_covering_every_row(data):
    make = lambda seed: dataset(path=data, image_column="images", prompt="{q}", split_column="split", seed=seed)  # noqa: E731
    first, again, other = ids(make(1), 32), ids(make(1), 32), ids(make(2), 32)
    assert first == again and first != other
    assert sorted(first[:16]) == sorted(first[16:]) and first[:16] != first[16:]  # each epoch all rows, reshuffled
    unshuffled = dataset(path=data, image_column="images", prompt="{q}", split_column="split", shuffle=False)
    assert ids(unshuffled, 3) == ["1", "2", "3"]


def test_a_resumed_source_continues_the_order_where_the_state_was_saved(data):
    make = lambda: dataset(path=data, image_column="images", prompt="{q}", seed=4)  # noqa: E731
    full = ids(make(), 50)
    source = make()
    ids(source, 23)
    state = source.state_dict()
    resumed = make()
    resumed.load_state_dict(json.loads(json.dumps(state)))  # as saved to disk
    assert ids(resumed, 27) == full[23:]


def test_epochs_bound_the_train_rows_and_an_exhausted_split_says_so():
    order = DataOrder(size=3, seed=0, epochs=2)
    assert sorted(order.next() for _ in range(6)) == [0, 0, 1, 1, 2, 2]
    with pytest.raises(DatasetExhaustedError, match="all 2 epoch"):
        order.next()


def test_single_turn_reward_and_multi_turn_feedback_with_a_discounted_retry(data):
    single = dataset(path=data, image_column="images", prompt="{q}", shuffle=False).episode(0)
    single.reset()
    assert single.step(single.row["answer"]) == ([], 1.0, True)
    multi = dataset(path=data, image_column="images", prompt="{q}", shuffle=False, max_turns=3,
                    feedback="No.", retry_discount=0.5).episode(0)
    multi.reset()
    assert multi.step("wrong") == ([{"role": "user", "content": "No."}], 0.0, False)
    assert multi.step(multi.answer()) == ([], 0.5, True)


def test_images_may_be_base64_bytes_data_urls_or_several_per_row(tmp_path):
    encoded = base64.b64encode(png_bytes((1, 2, 3))).decode()
    path = write(tmp_path, [{"image": {"bytes": encoded}, "question": "a", "answer": "x"},
                            {"image": ["data:image/png;base64," + encoded, {"bytes": encoded}], "question": "b",
                             "answer": "y"}])
    source = dataset(path=path, shuffle=False)
    parts = [[p["image"] for p in source.episode(0).reset()[0]["content"][:-1]] for _ in range(2)]
    assert parts == [["data:image/png;base64," + encoded], ["data:image/png;base64," + encoded] * 2]


def test_blank_images_keep_each_image_size(data):
    env = dataset(path=data, image_column="images", prompt="{q}", blank_images=True).episode(0)
    images = [p["image"] for p in env.reset()[0]["content"][:-1]]
    assert [(i.size, i.getcolors()) for i in images] == [((20, 10), [(200, (128, 128, 128))])] * 2


def test_the_vocabulary_has_the_answers_as_words_and_the_prompt_text(data):
    vocabulary = dataset(path=data, image_column="images", prompt="Q: {q}").vocabulary()
    assert vocabulary.words == tuple(str(i) for i in range(20))
    assert "sum" in vocabulary.prompt_words and set("Q: sum 19?") <= set(vocabulary.text)


@pytest.mark.parametrize("options, match", [
    ({"answer_column": "label"}, r"row 0 of .*data.jsonl has no column 'label' \(columns: \['answer', 'images'"),
    ({"image_column": "image"}, r"has no column 'image'"),
    ({"prompt": "{question}"}, r"prompt template '\{question\}' names field 'question', which the row lacks"),
    ({"split_column": "split", "train_split": "dev"}, r"leaves no train rows"),
])
def test_rows_that_do_not_fit_the_settings_are_dataset_errors_naming_the_column(data, options, match):
    with pytest.raises(DatasetError, match=match):
        dataset(path=data, **{"image_column": "images", "prompt": "{q}", **options})


def test_a_missing_file_and_a_bad_line_are_dataset_errors(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        dataset(path=str(tmp_path / "nope.jsonl"))
    (tmp_path / "bad.jsonl").write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(DatasetError, match=r"bad.jsonl:2 is a JSON list"):
        dataset(path=str(tmp_path / "bad.jsonl"))


def test_loaded_by_name_bad_settings_are_load_errors_naming_the_factory_and_the_cause(data):
    with pytest.raises(EnvLoadError, match=r"'dataset' raised DatasetError: .*no column 'label'") as info:
        load_environment("dataset", {"path": data, "image_column": "images", "prompt": "{q}",
                                     "answer_column": "label"})
    assert isinstance(info.value.__cause__, DatasetError)
    source = load_environment("dataset", {"path": data, "image_column": "images", "prompt": "{q}"}, seed=3)
    assert ids(source, 5) == ids(dataset(path=data, image_column="images", prompt="{q}", seed=3), 5)


def test_parquet_files_and_saved_datasets_give_the_rows_and_images_jsonl_gives(tmp_path):
    """The same rows as Parquet (image bytes) and as a ``datasets`` DatasetDict saved to disk (PIL images,
    its split names in ``split``): the same answers, splits and image pixels reach the episodes."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    colours = [(200, 0, 0), (0, 200, 0), (0, 0, 200)]
    rows = [{"image": {"bytes": png_bytes(c)}, "question": f"q{i}", "answer": str(i)} for i, c in enumerate(colours)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "data.parquet")
    from_parquet = dataset(path=str(tmp_path / "data.parquet"), shuffle=False)
    features = datasets.Features({"image": datasets.Image(), "question": datasets.Value("string"),
                                  "answer": datasets.Value("string")})
    parts = {"train": rows[:2], "test": rows[2:]}
    datasets.DatasetDict({name: datasets.Dataset.from_list(part, features=features) for name, part in parts.items()}
                         ).save_to_disk(tmp_path / "saved")
    saved = dataset(path=str(tmp_path / "saved"), split_column="split", eval_split="test", shuffle=False)

    def pixels(source, episodes):
        images = [e.reset()[0]["content"][0]["image"] for e in episodes]
        return [Image.open(io.BytesIO(base64.b64decode(i.split(",", 1)[1]))) if isinstance(i, str) else i
                for i in images]

    train = [from_parquet.episode(0) for _ in range(3)]
    assert [e.row["answer"] for e in train] == ["0", "1", "2"]
    assert [p.getpixel((0, 0)) for p in pixels(from_parquet, train)] == colours
    assert [e.row["answer"] for e in saved.eval_episodes()] == ["2"] and len(saved.train) == 2
    assert [p.convert("RGB").getpixel((0, 0)) for p in pixels(saved, [saved.episode(0), saved.episode(0)])] \
        == colours[:2]
    with pytest.raises(DatasetError, match="not a dataset saved with save_to_disk"):
        dataset(path=str(tmp_path))
