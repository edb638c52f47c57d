"""Every validation rule of the inference server is a 400 whose body names the problem."""

import asyncio

import pytest

from mmref.renderers import layout_spec, make_ref
from inference_cases import PAD, app_and_store, client, picture, prompt_with_images, served, stored_refs


@pytest.fixture(scope="module")
def setup():
    model = served("qwen2-vl")
    app, store = app_and_store(model)
    return model, app, store, stored_refs(model, store, 2)


def post(app, body):
    async def call():
        async with client(app) as c:
            return await c.post("/inference/v1/generate", json=body)
    return asyncio.run(call())


def body_for(refs, **sampling):
    ids, slots = prompt_with_images(refs)
    return {"token_ids": ids, "images": slots, "sampling": {"max_tokens": 2, **sampling}}


def expect_400(app, body, needle):
    response = post(app, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert needle in error["message"], error["message"]
    return error


def test_valid_request_succeeds(setup):
    _, app, _, refs = setup
    assert post(app, body_for(refs)).status_code == 200


def test_unparseable_ref_names_the_slot(setup):
    _, app, _, refs = setup
    body = body_for(refs)
    body["images"][1]["ref"] = "mmref:v9:abc"
    error = expect_400(app, body, "image slot 1: unknown ref contract version v9")
    assert error["detail"]["slot"] == 1


def test_fingerprint_drift_is_refused(setup):
    model, app, store, _ = setup
    drifted = make_ref(layout_spec("qwen2-vl", max_pixels=64 * 64), store.put_image(picture(7)))
    error = expect_400(app, body_for([drifted]), "layout fingerprint")
    assert error["detail"]["asset"] == drifted.asset


def test_family_mismatch_is_refused(setup):
    _, app, store, _ = setup
    other = make_ref(layout_spec("qwen3-vl"), store.put_image(picture(8)))
    expect_400(app, body_for([other]), "ref family 'qwen3-vl' but this inference server serves 'qwen2-vl'")


def test_edited_grid_and_token_count_are_refused(setup):
    _, app, _, refs = setup
    edited = refs[0].model_copy(update={"num_tokens": refs[0].num_tokens + 1})
    expect_400(app, body_for([edited]), "num_tokens")


def test_slot_length_and_position_rules(setup):
    _, app, _, refs = setup
    body = body_for(refs)
    body["images"][0]["length"] -= 1
    error = expect_400(app, body, "length")
    assert error["detail"]["expected"] == refs[0].num_tokens
    body = body_for(refs)
    body["images"][0]["offset"] -= 1
    expect_400(app, body, "covers 1 token(s) that are not image pads")


def test_pad_tokens_without_a_slot_are_refused(setup):
    _, app, _, refs = setup
    body = body_for(refs)
    body["images"] = body["images"][:1]
    expect_400(app, body, "image-pad tokens (id 151655) lie outside every image slot")
    body = body_for([])
    body["token_ids"] = body["token_ids"] + [PAD]
    expect_400(app, body, "1 image-pad tokens (id 151655) lie outside every image slot")


def test_bytes_that_do_not_hash_to_the_ref_are_refused(setup):
    model, app, _, _ = setup
    local_app, store = app_and_store(model)
    (ref,) = stored_refs(model, store, 1)
    store.fs.pipe_file(store.resolve(ref.asset), b"\x89PNG\r\n\x1a\n tampered")
    expect_400(local_app, body_for([ref]), "corrupt or tampered")


def test_missing_image_is_a_400_not_a_500(setup):
    model, _, _, _ = setup
    local_app, store = app_and_store(model)
    (ref,) = stored_refs(model, store, 1)
    store.fs.rm_file(store.resolve(ref.asset))
    expect_400(local_app, body_for([ref]), "is not in store")
    assert post(local_app, body_for([ref])).json()["error"]["type"] == "image_not_found"


def test_length_limit_and_schema_errors(setup):
    model, app, _, refs = setup
    expect_400(app, body_for(refs, max_tokens=model.engine.max_model_len), "exceeds max_model_len")
    expect_400(app, {"token_ids": [1], "sampling": {"temperature": -1}}, "temperature")
    expect_400(app, {"token_ids": [1], "pixel_values": [[0.1]]}, "pixel_values")


@pytest.mark.parametrize("token", [-1, 10**9])
def test_token_id_outside_the_vocabulary_is_a_400_naming_its_position(setup, token):
    model, app, _, _ = setup
    error = expect_400(app, {"token_ids": [1, 2, token]}, f"token_ids[2] = {token} is outside")
    assert error["detail"]["position"] == 2


@pytest.mark.parametrize("path", ["does/not/exist", "0" * 300 + "\x80" * 40])  # the second: ENAMETOOLONG
def test_a_checkpoint_path_that_cannot_be_read_is_a_400(setup, path):
    _, app, _, _ = setup

    async def call():
        async with client(app) as c:
            return await c.post("/update_weights", json={"path": path})
    response = asyncio.run(call())
    assert response.status_code == 400, response.text
    assert response.json()["error"]["type"] == "invalid_checkpoint"


def test_a_batch_answers_each_request_with_its_own_status_in_one_engine_batch(setup):
    model, app, _, refs = setup
    bad = body_for(refs)
    bad["images"][1]["ref"] = "mmref:v9:abc"
    batches = model.engine.batches

    async def call():
        async with client(app) as c:
            return await c.post("/inference/v1/generate_batch", json={"requests": [body_for(refs, n=2), bad,
                                                                                   body_for(refs[:1], n=2)]})
    response = asyncio.run(call())
    assert response.status_code == 200, response.text
    [first, second, third] = response.json()["results"]
    assert (first["status"], second["status"], third["status"]) == (200, 400, 200)
    assert "image slot 1: unknown ref contract version v9" in second["body"]["error"]["message"]
    assert [len(r["body"]["choices"]) for r in (first, third)] == [2, 2]
    assert model.engine.batches - batches == 1  # the good requests (equal sampling) sampled together


def test_an_empty_or_malformed_batch_is_a_400(setup):
    _, app, _, _ = setup
    for body in ({"requests": []}, {"requests": [{"token_ids": []}]}, {"reqs": []}):
        async def call():
            async with client(app) as c:
                return await c.post("/inference/v1/generate_batch", json=body)
        assert asyncio.run(call()).status_code == 400
