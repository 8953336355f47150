"""The mock's Responses API (POST /v1/responses), read by the real openai SDK and in raw bytes."""

from __future__ import annotations

import json

import aiohttp
import openai
import pytest

from proxy import tokens

MODEL = "gpt-4o"
TEXT = "The quick brown fox jumps over the lazy dog."
LONG = " ".join(f"word{i}" for i in range(60))


@pytest.fixture
async def client(mock_upstream):
    http_client = openai.DefaultAsyncHttpxClient(verify=False)
    async with openai.AsyncOpenAI(
        base_url=mock_upstream.url, api_key="sk-mock", max_retries=0, http_client=http_client
    ) as sdk:
        yield sdk


async def raw_events(mock_upstream, body: dict) -> list[tuple[str, dict]]:
    """(event line, data) of every SSE frame, checking the framing on the way."""
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{mock_upstream.url}/responses", json={**body, "stream": True}) as response:
            assert response.status == 200
            assert response.headers["Content-Type"] == "text/event-stream"
            text = (await response.read()).decode()
    assert text.endswith("\n\n") and "[DONE]" not in text
    frames = []
    for block in text.split("\n\n")[:-1]:
        event_line, data_line = block.split("\n")
        assert event_line.startswith("event: ") and data_line.startswith("data: ")
        frames.append((event_line.removeprefix("event: "), json.loads(data_line.removeprefix("data: "))))
    return frames


def prompt_tokens(messages: list[dict]) -> int:
    return tokens.count_chat_prompt(MODEL, messages)


async def test_a_whole_answer_echoes_the_input_with_true_usage(client):
    response = await client.responses.create(model=MODEL, input=TEXT, instructions="Be terse.")
    assert response.object == "response" and response.status == "completed"
    assert response.id.startswith("resp_mock_") and response.instructions == "Be terse."
    assert response.output_text == TEXT
    [message] = response.output
    assert message.type == "message" and message.role == "assistant" and message.status == "completed"
    assert [part.type for part in message.content] == ["output_text"]
    usage = response.usage
    expected_prompt = prompt_tokens([{"role": "system", "content": "Be terse."}, {"role": "user", "content": TEXT}])
    assert usage.input_tokens == expected_prompt
    assert usage.output_tokens == tokens.count_text(MODEL, TEXT)
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert usage.input_tokens_details.cached_tokens == 0 and usage.output_tokens_details.reasoning_tokens == 0


async def test_input_items_echo_the_last_user_message(client):
    items = [
        {"role": "user", "content": [{"type": "input_text", "text": "first"}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "ok"}]},
        {"type": "function_call", "call_id": "c1", "name": "lookup", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "42"},
        {"role": "user", "content": [{"type": "input_text", "text": "second "}, {"type": "input_text", "text": "turn"}]},
    ]
    response = await client.responses.create(model=MODEL, input=items)
    assert response.output_text == "second turn"
    counted = [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "ok"},
        {"role": "assistant", "tool_calls": [{"function": {"name": "lookup", "arguments": "{}"}}]},
        {"role": "tool", "content": "42"},
        {"role": "user", "content": "second turn"},
    ]
    assert response.usage.input_tokens == prompt_tokens(counted)


async def test_a_stream_has_every_event_in_order_with_consecutive_sequence_numbers(client, mock_upstream):
    frames = await raw_events(mock_upstream, {"model": MODEL, "input": TEXT})
    assert all(name == data["type"] for name, data in frames)  # every frame's event: line names its type
    assert [data["sequence_number"] for _, data in frames] == list(range(len(frames)))
    kinds = [name for name, _ in frames]
    words = len(TEXT.split())
    assert kinds == [
        "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
        *["response.output_text.delta"] * words,
        "response.output_text.done", "response.content_part.done", "response.output_item.done", "response.completed",
    ]
    deltas = [data for name, data in frames if name == "response.output_text.delta"]
    assert "".join(d["delta"] for d in deltas) == TEXT
    assert all(isinstance(d["obfuscation"], str) and d["obfuscation"] for d in deltas)
    by_kind = {name: data for name, data in frames}
    assert by_kind["response.output_text.done"]["text"] == TEXT
    assert by_kind["response.content_part.done"]["part"]["text"] == TEXT
    assert by_kind["response.output_item.done"]["item"]["content"][0]["text"] == TEXT
    final = by_kind["response.completed"]["response"]
    assert final["status"] == "completed" and final["output"][0]["content"][0]["text"] == TEXT
    assert final["usage"]["output_tokens"] == tokens.count_text(MODEL, TEXT)
    assert by_kind["response.created"]["response"]["usage"] is None

    stream = await client.responses.create(model=MODEL, input=TEXT, stream=True)
    events = [event async for event in stream]
    assert [e.type for e in events] == kinds
    assert events[-1].response.output_text == TEXT


async def test_the_stream_helper_gives_the_final_response(client):
    async with client.responses.stream(model=MODEL, input=TEXT) as stream:
        deltas = [event.delta async for event in stream if event.type == "response.output_text.delta"]
        final = await stream.get_final_response()
    assert "".join(deltas) == TEXT
    assert final.output_text == TEXT and final.status == "completed"
    assert final.usage.output_tokens == tokens.count_text(MODEL, TEXT)


async def test_a_reasoning_summary_comes_first_and_counts_as_reasoning_tokens(client, mock_upstream):
    steer = {"mock": {"reasoning": "Weigh the fox against the dog."}}
    whole = await client.responses.create(model=MODEL, input=TEXT, extra_body=steer)
    assert [item.type for item in whole.output] == ["reasoning", "message"]
    assert whole.output[0].summary[0].text == "Weigh the fox against the dog."
    reasoning = tokens.count_text(MODEL, "Weigh the fox against the dog.")
    assert whole.usage.output_tokens_details.reasoning_tokens == reasoning
    assert whole.usage.output_tokens == reasoning + tokens.count_text(MODEL, TEXT)

    frames = await raw_events(mock_upstream, {"model": MODEL, "input": TEXT, **steer})
    kinds = [name for name, _ in frames]
    assert kinds[2:5] == [
        "response.output_item.added", "response.reasoning_summary_part.added", "response.reasoning_summary_text.delta"
    ]
    deltas = [d["delta"] for n, d in frames if n == "response.reasoning_summary_text.delta"]
    assert "".join(deltas) == "Weigh the fox against the dog."
    done = {n: d for n, d in frames}
    assert done["response.reasoning_summary_text.done"]["text"] == "Weigh the fox against the dog."
    assert done["response.reasoning_summary_part.done"]["part"]["text"] == "Weigh the fox against the dog."
    assert [d["output_index"] for n, d in frames if n == "response.output_item.done"] == [0, 1]

    async with client.responses.stream(model=MODEL, input=TEXT, extra_body=steer) as stream:
        final = await stream.get_final_response()
    assert final.output[0].summary[0].text == "Weigh the fox against the dog." and final.output_text == TEXT


async def test_a_function_call_streams_its_arguments(client, mock_upstream):
    arguments = '{"city": "Paris", "unit": "celsius"}'
    steer = {"mock": {"tool_call": {"name": "get_weather", "arguments": arguments}, "chunk_chars": 5}}
    whole = await client.responses.create(model=MODEL, input=TEXT, extra_body=steer)
    [call] = whole.output
    assert call.type == "function_call" and call.name == "get_weather" and call.arguments == arguments
    assert call.call_id.startswith("call_mock_") and whole.output_text == ""
    assert whole.usage.output_tokens == tokens.count_text(MODEL, arguments) + tokens.count_text(MODEL, "get_weather")

    frames = await raw_events(mock_upstream, {"model": MODEL, "input": TEXT, **steer})
    deltas = [d["delta"] for n, d in frames if n == "response.function_call_arguments.delta"]
    assert len(deltas) == len(range(0, len(arguments), 5)) and "".join(deltas) == arguments
    assert {n: d for n, d in frames}["response.function_call_arguments.done"]["arguments"] == arguments

    async with client.responses.stream(model=MODEL, input=TEXT, extra_body=steer) as stream:
        final = await stream.get_final_response()
    assert final.output[0].arguments == arguments


async def test_a_refusal_is_a_refusal_part(client, mock_upstream):
    steer = {"mock": {"refusal": "I can't help with that."}}
    whole = await client.responses.create(model=MODEL, input=TEXT, extra_body=steer)
    [part] = whole.output[0].content
    assert part.type == "refusal" and part.refusal == "I can't help with that." and whole.output_text == ""

    frames = await raw_events(mock_upstream, {"model": MODEL, "input": TEXT, **steer})
    assert "".join(d["delta"] for n, d in frames if n == "response.refusal.delta") == "I can't help with that."
    assert {n: d for n, d in frames}["response.refusal.done"]["refusal"] == "I can't help with that."
    assert not any(n == "response.output_text.delta" for n, _ in frames)

    async with client.responses.stream(model=MODEL, input=TEXT, extra_body=steer) as stream:
        final = await stream.get_final_response()
    assert final.output[0].content[0].refusal == "I can't help with that."


async def test_max_output_tokens_cuts_the_answer_as_incomplete(client, mock_upstream):
    whole = await client.responses.create(model=MODEL, input=LONG, max_output_tokens=20)
    encoding = tokens.encoding_for_model(MODEL)
    assert whole.status == "incomplete" and whole.incomplete_details.reason == "max_output_tokens"
    assert whole.output_text == encoding.decode(encoding.encode(LONG)[:20])
    assert whole.output[0].status == "incomplete" and whole.usage.output_tokens == 20

    frames = await raw_events(mock_upstream, {"model": MODEL, "input": LONG, "max_output_tokens": 20})
    name, last = frames[-1]
    assert name == "response.incomplete" and last["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    assert "".join(d["delta"] for n, d in frames if n == "response.output_text.delta") == whole.output_text

    # Reasoning counts against the cap: a long summary leaves no room for the message.
    steer = {"mock": {"reasoning": LONG}}
    cut = await client.responses.create(model=MODEL, input=TEXT, max_output_tokens=16, extra_body=steer)
    assert [item.type for item in cut.output] == ["reasoning"] and cut.usage.output_tokens == 16

    # Both SDK streaming paths iterate a stream that ends incomplete without raising.
    stream = await client.responses.create(model=MODEL, input=LONG, max_output_tokens=20, stream=True)
    assert [e.type async for e in stream][-1] == "response.incomplete"
    async with client.responses.stream(model=MODEL, input=LONG, max_output_tokens=20) as helper:
        events = [event async for event in helper]
    assert events[-1].type == "response.incomplete" and events[-1].response.status == "incomplete"


async def test_ignore_cap_answers_past_max_output_tokens(client):
    whole = await client.responses.create(
        model=MODEL, input=LONG, max_output_tokens=16, extra_body={"mock": {"ignore_cap": True}}
    )
    assert whole.status == "completed" and whole.output_text == LONG


async def test_fail_after_ends_with_response_failed(client, mock_upstream):
    steer = {"mock": {"fail_after": 2}}
    frames = await raw_events(mock_upstream, {"model": MODEL, "input": TEXT, **steer})
    name, last = frames[-1]
    assert name == "response.failed" and last["response"]["status"] == "failed"
    assert last["response"]["error"]["code"] == "server_error" and last["response"]["usage"] is None
    assert last["response"]["output"][0]["content"][0]["text"] == "The quick "  # what was sent before the failure
    assert [d["sequence_number"] for _, d in frames] == list(range(len(frames)))

    async with client.responses.stream(model=MODEL, input=TEXT, extra_body=steer) as stream:
        events = [event async for event in stream]
        with pytest.raises(RuntimeError):  # the helper's own signal: no response.completed came
            await stream.get_final_response()
    assert events[-1].type == "response.failed" and events[-1].response.error.code == "server_error"

    whole = await client.responses.create(model=MODEL, input=TEXT, extra_body=steer)
    assert whole.status == "failed" and whole.error.code == "server_error"


async def test_error_after_sends_an_error_event(client, mock_upstream):
    frames = await raw_events(mock_upstream, {"model": MODEL, "input": TEXT, "mock": {"error_after": 1}})
    name, last = frames[-1]
    assert name == "error" and last["code"] == "server_error" and last["message"]
    assert sum(n == "response.output_text.delta" for n, _ in frames) == 1
    stream = await client.responses.create(model=MODEL, input=TEXT, stream=True, extra_body={"mock": {"error_after": 1}})
    assert [e.type async for e in stream][-1] == "error"
    with pytest.raises(openai.InternalServerError):
        await client.responses.create(model=MODEL, input=TEXT, extra_body={"mock": {"error_after": 1}})


async def test_drop_after_cuts_the_connection(client):
    stream = await client.responses.create(model=MODEL, input=TEXT, stream=True, extra_body={"mock": {"drop_after": 2}})
    deltas = []
    with pytest.raises(openai.APIConnectionError):
        async for event in stream:
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
    assert "".join(deltas) == "The quick "


async def test_cached_tokens_are_reported(client):
    whole = await client.responses.create(model=MODEL, input=TEXT, extra_body={"mock": {"cached_tokens": 5}})
    assert whole.usage.input_tokens_details.cached_tokens == 5


async def test_usage_false_leaves_usage_out(client):
    whole = await client.responses.create(model=MODEL, input=TEXT, extra_body={"mock": {"usage": False}})
    assert whole.usage is None


@pytest.mark.parametrize("status, error", [(500, openai.InternalServerError), (429, openai.RateLimitError),
                                           (400, openai.BadRequestError)])
async def test_status_raises_the_sdks_exception(client, status, error):
    with pytest.raises(error) as caught:
        await client.responses.create(model=MODEL, input=TEXT, stream=True, extra_body={"mock": {"status": status}})
    assert caught.value.status_code == status


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"max_output_tokens": 15}, "max_output_tokens"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"max_tokens": 100}, "max_tokens"),
        ({"input": 5}, "input"),
        ({"instructions": ["x"]}, "instructions"),
        ({"mock": {"thinking": "x"}}, "mock.thinking"),  # that is /v1/messages' name for it
        ({"mock": {"no_done": True}}, "mock.no_done"),
        ({"mock": {"refusal": "no", "tool_call": {"name": "f"}}}, "mock.refusal"),
    ],
)
async def test_what_the_api_refuses_is_a_400_naming_the_field(client, fields, param):
    body = {"model": MODEL, "input": TEXT, **fields}
    with pytest.raises(openai.BadRequestError) as caught:
        await client.post("/responses", body=body, cast_to=object)
    assert caught.value.param == param


async def test_a_lone_surrogate_and_non_ascii_stream_as_utf8(mock_upstream):
    frames = await raw_events(mock_upstream, {"model": MODEL, "input": "naïve 東京 \ud800!", "mock": {"chunk_chars": 1}})
    assert "".join(d["delta"] for n, d in frames if n == "response.output_text.delta") == "naïve 東京 \ufffd!"
