"""Continuous batching (serve.scheduler): rows join and leave the decode loop at any step, each with its own
sampling settings; answers equal llava.decoding's batch inference. No Ray: the scheduler runs in this process."""

import math
import threading

import pytest

from tests.conftest import png


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    from llava.model import LlavaModel

    return LlavaModel.from_pretrained(tiny_checkpoint).eval()


def encode(model, text: str, images=()):
    from llava.generation import Prompt, encode_prompt

    return encode_prompt(model, Prompt([{"from": "human", "value": text}], list(images)))


class Answer:
    """Collects one row's outputs (on the loop thread) with the scheduler step each came at."""

    def __init__(self, scheduler, on_output=None):
        self.scheduler, self.on_output = scheduler, on_output
        self.text, self.steps, self.outputs, self.done = "", [], [], threading.Event()

    def __call__(self, out) -> None:
        self.text += out.delta
        self.outputs.append(out)
        self.steps.append(self.scheduler.step)
        if self.on_output:
            self.on_output(self)
        if out.finish_reason:
            self.done.set()

    @property
    def final(self):
        return self.outputs[-1]

    def wait(self) -> "Answer":
        assert self.done.wait(300), "the row never finished"
        return self


def submit(scheduler, encoded, params, **kwargs):
    answer = Answer(scheduler, kwargs.pop("on_output", None))
    row = scheduler.submit(encoded, params, answer, **kwargs)
    return row, answer


def test_a_request_joins_while_another_decodes_and_greedy_answers_equal_batch_inference(model):
    from llava.decoding import SamplingParams, greedy_decode
    from serve.scheduler import Scheduler, SchedulerConfig

    scheduler = Scheduler(model, SchedulerConfig(max_rows=4))
    params = SamplingParams(max_tokens=14, temperature=0)
    prompts = [
        encode(model, "<image>\nWhat is in the picture?", [png(1)]),
        encode(model, "Tell me a long story about two cats and a dog, with many details."),
        encode(model, "hi"),
    ]
    late = []

    def after_third_token(answer):  # sent from inside the first row's decode: it must join at a coming step
        if len(answer.outputs) == 3:
            late.extend(submit(scheduler, p, params) for p in prompts[1:])

    first_row, first = submit(scheduler, prompts[0], params, on_output=after_third_token)
    first.wait()
    answers = [first] + [answer.wait() for _, answer in late]
    scheduler.close()
    rows = [first_row] + [row for row, _ in late]
    assert [a.text for a in answers] == greedy_decode(model, prompts, max_new_tokens=14)
    assert all(a.final.finish_reason in ("stop", "length") and a.final.error is None for a in answers)
    for row in rows[1:]:  # joined during the first row's decode, before it finished
        assert first.steps[2] < row.joined_step < first_row.finished_step
    # the first row's prefill step also decodes its second token; after that, one token at every step:
    # the others' joins never cost it a step
    assert first.steps[0] == first.steps[1] == first_row.joined_step
    assert first.steps[1:] == list(range(first.steps[1], first_row.finished_step + 1))


def test_each_row_keeps_its_own_sampling_settings(model):
    from llava.decoding import BatchDecoder, SamplingParams, greedy_decode
    from serve.scheduler import Scheduler

    prompt = encode(model, "Tell me a long story about two cats and a dog.")
    other = encode(model, "<image>\nDescribe it.", [png(4)])
    full = greedy_decode(model, [prompt], max_new_tokens=20)[0]
    stop = next(full[i : i + 3] for i in range(2, len(full) - 2) if full[i : i + 3].isalpha())
    sampled = SamplingParams(max_tokens=12, temperature=1.5, top_p=0.95, seed=7)
    alone = BatchDecoder(model, [prompt], [sampled]).run()[0]  # the same seed decoded on its own

    scheduler = Scheduler(model, start=False)  # all four are submitted before the loop runs: one group
    settings = [
        SamplingParams(max_tokens=20, temperature=0),
        sampled,
        SamplingParams(max_tokens=20, temperature=0, stop=[stop]),
        SamplingParams(max_tokens=3, temperature=0),
    ]
    submitted = [submit(scheduler, p, s) for p, s in zip([prompt, prompt, prompt, other], settings)]
    scheduler.start()
    (greedy_row, greedy), (_, seeded), (_, cut), (_, short) = [(row, a.wait()) for row, a in submitted]
    scheduler.close()
    assert len({row.joined_step for row, _ in submitted}) == 1  # decoded together
    assert greedy.text == full
    assert seeded.text == alone and seeded.text != full
    assert cut.text == full[: full.index(stop)].rstrip() and cut.final.finish_reason == "stop"
    assert short.final.finish_reason == "length" and short.final.completion_tokens == 3
    assert short.text == greedy_decode(model, [other], max_new_tokens=3)[0]


def test_a_failing_row_fails_alone_and_the_rows_beside_it_decode_as_without_it(model):
    from llava.decoding import SamplingParams, greedy_decode
    from serve.scheduler import Scheduler

    prompts = [encode(model, "<image>\nWhat is it?", [png(1)]), encode(model, "poison"), encode(model, "Tell me more.")]
    greedy = SamplingParams(max_tokens=8, temperature=0)
    poisoned = SamplingParams(max_tokens=8, temperature=float("nan"))  # torch.multinomial refuses NaN probabilities
    scheduler = Scheduler(model, start=False)
    answers = [submit(scheduler, p, s)[1] for p, s in zip(prompts, [greedy, poisoned, greedy])]
    scheduler.start()
    for answer in answers:
        answer.wait()
    assert answers[1].final.finish_reason == "error" and "RuntimeError" in answers[1].final.error
    assert [answers[0].text, answers[2].text] == greedy_decode(model, [prompts[0], prompts[2]], max_new_tokens=8)
    # the loop goes on: a request after the failure is answered normally
    after = submit(scheduler, prompts[1], greedy)[1].wait()
    scheduler.close()
    assert after.text == greedy_decode(model, [prompts[1]], max_new_tokens=8)[0]


def test_a_long_prompt_is_prefilled_in_chunks_between_the_running_rows_steps(model):
    from llava.decoding import SamplingParams, greedy_decode
    from serve.scheduler import Scheduler, SchedulerConfig

    scheduler = Scheduler(model, SchedulerConfig(prefill_chunk_tokens=16))
    running = encode(model, "Say something.")
    long = encode(model, "<image>\n" + "Please describe every detail of this picture. " * 6, [png(9)])
    assert len(long.input_ids) > 4 * 16
    params = SamplingParams(max_tokens=40, temperature=0)
    late = []

    def after_second_token(answer):
        if len(answer.outputs) == 2:
            late.append((scheduler.step, *submit(scheduler, long, SamplingParams(max_tokens=6, temperature=0))))

    _, first = submit(scheduler, running, params, on_output=after_second_token)
    first.wait()
    ((sent_at, long_row, long_answer),) = late
    long_answer.wait()
    scheduler.close()
    assert long_row.prefill_chunks == math.ceil(len(long.input_ids) / 16)
    during_prefill = [s for s in first.steps if sent_at < s < long_row.joined_step]
    assert len(during_prefill) >= long_row.prefill_chunks - 1, "the running row must decode between the chunks"
    assert long_answer.text == greedy_decode(model, [long], max_new_tokens=6)[0]
    assert first.text == greedy_decode(model, [running], max_new_tokens=40)[0]


def test_non_streaming_rows_get_one_output_and_cancelled_rows_leave(model):
    from llava.decoding import SamplingParams, greedy_decode
    from serve.scheduler import Scheduler

    prompts = [encode(model, "First question?"), encode(model, "Second question?")]
    params = SamplingParams(max_tokens=10, temperature=0)
    scheduler = Scheduler(model, start=False)
    whole = submit(scheduler, prompts[0], params, stream=False)[1]
    cancelled_row, cancelled = submit(
        scheduler,
        prompts[1],
        SamplingParams(max_tokens=500, temperature=0),
        on_output=lambda a: setattr(cancelled_row, "cancelled", len(a.outputs) >= 2),
    )
    scheduler.start()
    whole.wait()
    while scheduler.running:  # the cancelled row leaves at the step after it was cancelled
        threading.Event().wait(0.05)
    scheduler.close()
    assert len(whole.outputs) == 2 and whole.outputs[0].completion_tokens == 1  # the first token, then the rest
    assert whole.text == greedy_decode(model, prompts[:1], max_new_tokens=10)[0]
    assert cancelled.final.finish_reason is None and len(cancelled.outputs) <= 3


def test_models_with_sliding_window_caches_are_refused():
    from transformers import MistralConfig

    from serve.scheduler import new_cache

    config = MistralConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=8,
        vocab_size=100,
    )
    with pytest.raises(ValueError, match="sliding-window"):
        new_cache(config)
