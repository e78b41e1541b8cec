"""DPG-Bench: the release files (hand-built CSVs, hostile rows), the dependency rule, the two
upstream scoring bugs (old against fixed numbers, computed by hand), the 2x2 grid, the shapes set,
the exact shapes VQA and the transformers VQA backend (tiny models built from config)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tokenflow.config import ConfigError, load_config
from tokenflow.data.corpus import RawSample
from tokenflow.data.shapes import (OPPOSITE_RELATION, PALETTE, SHAPES, Scene, annotate, encode_png, generate_scene,
                                   render_scene)
from tokenflow.eval.dpg import (COLUMNS, DPGItem, DPGQuestion, load_dpg, score_dpg, score_prompt, split_grid,
                                tile_grid, write_dpg)
from tokenflow.eval.dpg_vqa import ShapesVQA, TransformersVQA
from tokenflow.eval.shapes_dpg import Claim, parse_question, questions_for_scene, write_shapes_dpg
from tokenflow.eval.shapes_geneval import scene_from_record

from tests.conftest import MODEL_CONFIGS

HEADER = ",".join(COLUMNS)
# Item a: 1 <- 2 (a child of 1), 3 alone; item b: the chain 1 <- 2 <- 3.
ROWS = {
    "a1": 'a,A dog in a park.,dog,1,0,entity,whole,entity - whole (dog),Is there a dog?',
    "a2": 'a,A dog in a park.,"dog,brown",2,1,attribute,color,"attribute - color (dog, brown)",Is the dog brown?',
    "a3": 'a,A dog in a park.,park,3,0,global,,global - (park),Is this a park?',
    "b1": 'b,A cat on a mat.,cat,1,0,entity,whole,entity - whole (cat),Is there a cat?',
    "b2": 'b,A cat on a mat.,"cat,mat",2,1,relation,spatial,"relation - spatial (cat, mat, on)",Is the cat on the mat?',
    "b3": 'b,A cat on a mat.,cat,3,2,other,count,"other - count (cat, ==2)",Are there two cats?',
}
Y, N = "yes", "no"
# answers[item][tile] = answers to propositions 1, 2, 3
ANSWERS = {"a": [(Y, Y, Y), (N, Y, Y), (Y, N, N), (Y, Y, N)],
           "b": [(Y, Y, Y), (Y, N, Y), (N, N, Y), (Y, Y, N)]}


def _release(root: Path, rows: list[str], prompts: dict[str, str] | None = None) -> str:
    (root / "prompts").mkdir(parents=True, exist_ok=True)
    (root / "dpg_bench.csv").write_text("\n".join([HEADER, *rows]) + "\n")
    for item_id, prompt in (prompts or {"a": "A dog in a park.\n", "b": "A cat on a mat."}).items():
        (root / "prompts" / f"{item_id}.txt").write_text(prompt)
    return str(root)


def _answers() -> dict[str, list[dict[int, str]]]:
    return {item: [dict(zip((1, 2, 3), tile)) for tile in tiles] for item, tiles in ANSWERS.items()}


def test_dependency_rule_zeroes_children_of_a_failed_parent_down_the_chain():
    b = DPGItem("b", "p", (DPGQuestion(1, (), "entity - whole (cat)", "q1"),
                           DPGQuestion(2, (1,), "relation - spatial (cat, mat, on)", "q2"),
                           DPGQuestion(3, (2,), "other - count (cat, ==2)", "q3")))
    # the parent fails: its child and grandchild count 0 although answered yes
    assert score_prompt(b, [{1: N, 2: Y, 3: Y}]).score == 0.0
    assert score_prompt(b, [{1: Y, 2: N, 3: Y}]).score == pytest.approx(1 / 3)
    # only an exact "yes" passes, as the official comparison
    assert score_prompt(b, [{1: "Yes", 2: Y, 3: Y}]).score == 0.0
    # one pass in CSV order: a child listed before its parent sees the parent's own answer
    late = DPGItem("c", "p", (b.questions[0], b.questions[2], b.questions[1]))
    assert score_prompt(late, [{1: N, 2: Y, 3: Y}]).score == pytest.approx(1 / 3)


def test_fixed_and_upstream_scores_on_a_hand_built_csv(tmp_path):
    """Fixed: a = (1 + 1/3 + 1/3 + 2/3) / 4 = 7/12, b = (1 + 1/3 + 0 + 2/3) / 4 = 1/2, overall
    13/24; categories pool each question's raw answers over the four tiles. Upstream: the first
    row (a's proposition 1) is skipped, a's proposition 2 depends on it, so the official script
    drops item a (#61), and the categories read b's last tile only (#60)."""
    root = _release(tmp_path, [ROWS[k] for k in ("a1", "a2", "a3", "b1", "b2", "b3")])
    items = load_dpg(root)
    assert [i.item_id for i in items] == ["a", "b"] and items[0].prompt == "A dog in a park."
    assert items[1].questions[2] == DPGQuestion(3, (2,), "other - count (cat, ==2)", "Are there two cats?", "cat",
                                                "other", "count")
    answers = _answers()

    fixed = score_dpg(items, answers).metrics()
    assert fixed == pytest.approx({
        "overall": 13 / 24, "entity": 3 / 4, "entity/whole": 3 / 4, "attribute": 3 / 4, "attribute/color": 3 / 4,
        "global": 1 / 2, "relation": 1 / 2, "relation/spatial": 1 / 2, "other": 3 / 4, "other/count": 3 / 4,
        "num_prompts": 2, "num_questions": 6, "unscored_prompts": 0})
    tiles = [score for p in score_dpg(items, answers).prompts for score in p.tile_scores]
    assert tiles == pytest.approx([1, 1 / 3, 1 / 3, 2 / 3] + [1, 1 / 3, 0, 2 / 3])

    upstream = score_dpg(items, answers, upstream_bugs=True).metrics()
    assert upstream == pytest.approx({
        "overall": 1 / 2, "entity": 1.0, "entity/whole": 1.0, "relation": 1.0, "relation/spatial": 1.0,
        "other": 0.0, "other/count": 0.0, "num_prompts": 2, "num_questions": 5, "unscored_prompts": 1})


def test_upstream_first_row_without_dependents_only_drops_that_question(tmp_path):
    """The first row is a's global question, which nothing depends on: upstream scores a on its
    two other questions ((1 + 0 + 1/2 + 1) / 4 = 5/8) and the overall is (5/8 + 1/2) / 2."""
    root = _release(tmp_path, [ROWS[k] for k in ("a3", "a1", "a2", "b1", "b2", "b3")])
    items = load_dpg(root)
    answers = _answers()
    assert score_dpg(items, answers).metrics()["overall"] == pytest.approx(13 / 24)  # the order changes nothing
    upstream = score_dpg(items, answers, upstream_bugs=True).metrics()
    assert upstream["overall"] == pytest.approx(9 / 16) and upstream["unscored_prompts"] == 0
    assert "global" not in upstream and upstream["attribute"] == 1.0 and upstream["entity"] == 1.0


@pytest.mark.parametrize("rows, problem", [
    ([ROWS["a1"].replace(",1,0,", ",x,0,")], "line 2, column 'proposition_id': not a positive integer"),
    ([ROWS["a1"].replace(",1,0,", ",0,0,")], "line 2, column 'proposition_id'"),
    ([ROWS["a1"], ROWS["a2"].replace(",2,1,", ',2,"1;2",')], "line 3, column 'dependency'"),
    ([ROWS["a1"], ROWS["a2"].replace(",2,1,", ",2,7,")], "line 3, column 'dependency': item 'a' has no proposition 7"),
    ([ROWS["a1"], ROWS["a2"].replace(",2,1,", ",2,2,")], "proposition 2 depends on itself"),
    ([ROWS["a1"], ROWS["a1"]], "line 3, column 'proposition_id': item 'a' already has proposition 1 (line 2)"),
    ([ROWS["a1"], ROWS["b1"], ROWS["a2"]], "line 4: item 'a' continues here after other items' rows"),
    ([ROWS["a1"].replace("a,", "../a,", 1)], "line 2, column 'item_id': '../a' is not a plain file stem"),
    ([ROWS["a1"].replace("Is there a dog?", "")], "line 2, column 'question_natural_language': empty"),
    ([ROWS["a1"] + ",extra"], "line 2: more fields than the header's 9"),
    ([ROWS["a1"].rsplit(",", 2)[0]], "line 2: fewer fields than the header's 9"),
    ([ROWS["a1"].replace("entity - whole (dog)", "(dog)")], "column 'tuple': '(dog)' names no category"),
    ([], "no questions"),
])
def test_bad_rows_fail_naming_line_and_column(tmp_path, rows, problem):
    with pytest.raises(ValueError, match=problem.replace("(", r"\(").replace(")", r"\)")):
        load_dpg(_release(tmp_path, rows))


def test_missing_columns_and_files_are_named(tmp_path):
    root = _release(tmp_path, [ROWS["a1"]], {"a": "A dog."})
    (tmp_path / "dpg_bench.csv").write_text("item_id,proposition_id,tuple\n")
    with pytest.raises(ValueError, match="the header lacks dependency, question_natural_language"):
        load_dpg(root)
    _release(tmp_path, [ROWS["a1"], ROWS["b1"]], {"a": "A dog."})
    with pytest.raises(FileNotFoundError, match="prompts/b.txt"):
        load_dpg(root)
    (tmp_path / "prompts" / "b.txt").write_text("  \n")
    with pytest.raises(ValueError, match="empty prompt"):
        load_dpg(root)
    with pytest.raises(FileNotFoundError, match="no-such/dpg_bench.csv"):
        load_dpg(str(tmp_path / "no-such"))


def test_written_release_reads_back(tmp_path):
    root = _release(tmp_path / "in", [ROWS[k] for k in ("a1", "a2", "a3", "b1", "b2", "b3")])
    items = load_dpg(root)
    write_dpg(str(tmp_path / "out"), items)
    assert load_dpg(str(tmp_path / "out")) == items


def test_grid_tiles_in_the_official_crop_order():
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8) for _ in range(4)]
    grid = tile_grid(images)
    assert grid.shape == (16, 16, 3)
    tiles = split_grid(Image.fromarray(grid))
    assert all(np.array_equal(np.asarray(t), im) for t, im in zip(tiles, images))
    # compute_dpg_bench.py's crops at resolution R: (0,0,R,R), (R,0,2R,R), (0,R,R,2R), (R,R,2R,2R)
    assert np.array_equal(np.asarray(tiles[1]), grid[0:8, 8:16]) and np.array_equal(np.asarray(tiles[2]),
                                                                                      grid[8:16, 0:8])
    with pytest.raises(ValueError, match="square with an even side"):
        split_grid(Image.new("RGB", (16, 15)))
    with pytest.raises(ValueError, match="takes 4 images of one shape"):
        tile_grid(images[:3])


def _scene_samples(n: int, seed: int = 0) -> list[RawSample]:
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(n):
        scene = generate_scene(rng, 64)
        samples.append(RawSample(f"shapes-{i:08d}", encode_png(render_scene(scene, 64)),
                                 json=json.dumps(annotate(scene, rng))))
    return samples


def _scene(sample: RawSample) -> Scene:
    return scene_from_record(json.loads(sample.json))


def test_shapes_set_is_written_in_the_release_layout(tmp_path):
    samples = _scene_samples(120)
    sourced = write_shapes_dpg(str(tmp_path), samples, num_prompts=12)
    items = load_dpg(str(tmp_path))
    assert [i for _, i in sourced] == items and len(items) == 12
    assert [i.item_id for i in items] == [f"shapes_{k:04d}" for k in range(12)]
    assert len({i.prompt for i in items}) == 12
    for sample, item in sourced:
        groups = _scene(sample).groups()
        assert len(groups) >= 2 and len({g.shape for g in groups}) == len(groups)
        assert (tmp_path / "prompts" / f"{item.item_id}.txt").read_text() == item.prompt
        assert [q.proposition_id for q in item.questions] == list(range(1, len(item.questions) + 1))
        entities = [q for q in item.questions if q.category == "entity - whole"]
        assert len(entities) == len(groups) and all(not q.parents for q in entities)
        assert len(item.questions) == 3 * len(groups) + (len(groups) == 2)
        for q in item.questions[len(groups):]:
            assert q.parents and all(p <= len(groups) for p in q.parents)
            assert q.category == f"{q.category_broad} - {q.category_detailed}"
    first = items[0]
    assert sum(q.category == "relation - spatial" for q in first.questions) == (len(first.questions) == 7)


def test_shapes_vqa_answers_a_rendered_scene_exactly():
    """Every question of a scene's item reads "yes" on the scene; the same questions with a wrong
    colour, count, relation or an absent shape read "no"."""
    vqa = ShapesVQA()
    checked = 0
    for sample in _scene_samples(150, seed=1):
        questions = questions_for_scene(_scene(sample))
        if questions is None:
            continue
        image = Image.open(io.BytesIO(sample.image))
        assert vqa.answer(image, [q.question for q in questions]) == ["yes"] * len(questions)
        wrong = []
        shapes = {parse_question(q.question).shape for q in questions}
        absent = next(s for s in SHAPES if s not in shapes) if len(shapes) < 3 else None
        for q in questions:
            claim = parse_question(q.question)
            if claim.kind == "color":
                other = next(c for c in PALETTE if c != claim.color)
                wrong.append(q.question.replace(f" {claim.color}?", f" {other}?"))
            elif claim.kind == "count":
                word = "four" if claim.count != 4 else "two"
                wrong.append(f"Are there exactly {word} {claim.shape}s?")
            elif claim.kind == "relation":
                wrong.append(q.question.replace(claim.relation, OPPOSITE_RELATION[claim.relation]))
        if absent:
            wrong.append(f"Is there a {absent}?")
        assert vqa.answer(image, wrong) == ["no"] * len(wrong)
        checked += 1
    assert checked >= 30


def test_parse_question_reads_the_grammar_and_refuses_anything_else():
    assert parse_question("Are there exactly two circles?") == Claim("count", "circle", count=2)
    assert parse_question("Are the squares left of the triangle?") == Claim("relation", "square", relation="left of",
                                                                            other="triangle")
    assert parse_question("Is the triangle purple?") == Claim("color", "triangle", color="purple")
    with pytest.raises(ValueError, match="not a shapes DPG question"):
        parse_question("Is there a dog?")
    with pytest.raises(ValueError, match="not a shapes DPG question"):
        ShapesVQA().answer(Image.new("RGB", (64, 64), "white"), ["Is the sky blue?"])


WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "yes", "no", "is", "there", "a", "circle", "?", "the", "red"]


def test_transformers_vqa_generative_and_classifier_models(tmp_path):
    """A tiny BLIP (generative; its LM head biased to "yes") and a tiny ViLT (classifier; its head
    biased to the label "yes"), saved and loaded through the backend."""
    from transformers import (BertTokenizerFast, BlipConfig, BlipForQuestionAnswering, BlipImageProcessor,
                              BlipProcessor, ViltConfig, ViltForQuestionAnswering, ViltImageProcessor, ViltProcessor)

    torch.manual_seed(0)
    blip_dir, vilt_dir = tmp_path / "blip", tmp_path / "vilt"
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(WORDS)})
    layers = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    blip = BlipForQuestionAnswering(BlipConfig(
        text_config=dict(vocab_size=len(WORDS), bos_token_id=2, sep_token_id=3, pad_token_id=0, **layers),
        vision_config=dict(image_size=32, patch_size=16, **layers), projection_dim=16))
    with torch.no_grad():
        blip.text_decoder.cls.predictions.bias[WORDS.index("yes")] = 100.0
    blip.save_pretrained(blip_dir)
    BlipProcessor(BlipImageProcessor(size={"height": 32, "width": 32}), tok).save_pretrained(blip_dir)
    labels = {0: "no", 1: "yes"}
    vilt = ViltForQuestionAnswering(ViltConfig(vocab_size=len(WORDS), image_size=32, patch_size=16, id2label=labels,
                                               label2id={v: k for k, v in labels.items()}, **layers))
    with torch.no_grad():
        vilt.classifier[-1].bias[:] = torch.tensor([0.0, 100.0])
    vilt.save_pretrained(vilt_dir)
    ViltProcessor(ViltImageProcessor(size={"shortest_edge": 32}, size_divisor=32), tok).save_pretrained(vilt_dir)

    image = Image.new("RGB", (40, 48), "white")
    questions = ["is there a circle?", "is the circle red?"]
    assert TransformersVQA(blip_dir, max_new_tokens=1).answer(image, questions) == ["yes", "yes"]
    assert TransformersVQA(vilt_dir).answer(image, questions) == ["yes", "yes"]
    with pytest.raises(FileNotFoundError, match="no-vqa"):
        TransformersVQA(tmp_path / "no-vqa")


def test_config_requires_the_release_and_the_vqa_model():
    with pytest.raises(ConfigError, match="benchmark dpg needs root_url, vqa_model_path"):
        load_config(MODEL_CONFIGS / "tokenflow-tiny.yaml", ["eval.dpg.benchmark=dpg"])
    cfg = load_config(MODEL_CONFIGS / "tokenflow-tiny.yaml", ["eval.dpg.benchmark=dpg", "eval.dpg.root_url=s3://b/dpg",
                                                             "eval.dpg.vqa_model_path=/models/vqa",
                                                             "eval.dpg.upstream_bugs=true"])
    assert cfg.eval.dpg.upstream_bugs and cfg.eval.dpg.shapes_prompts == 40
