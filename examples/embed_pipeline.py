"""Embedding onellm in an application: the Python API without the command line.

A small "sensor app": it holds six IMU channels in memory (as an app reading a phone's
sensors would), asks about them with a streamed answer, asks a follow-up that reuses
the KV cache, and shows cancellation from another thread (a UI's Stop button, pressed
as soon as the first words of the answer appear).

    python examples/embed_pipeline.py [BUNDLE_DIR]

Without BUNDLE_DIR it uses the demo bundle (`onellm export --demo` builds it; `onellm
ask` builds it on first use). The demo's weights are random: its answers are noise.

Thread-safety rule: one `Pipeline` may be shared by threads; it answers up to `parallel`
requests at once (`Pipeline.load(..., parallel=N)`, default 1: more wait for a slot); a
stream's `cancel()` (one request) and `pipe.cancel()` (every open request) may be called
from any thread.
"""

from __future__ import annotations

import sys
import threading

import numpy as np

from onellm.runtime.decoder import Sampling
from onellm.runtime.pipeline import Pipeline


def fake_sensor_stream(seconds: float = 3.0, rate: float = 100.0) -> np.ndarray:
    """[N, 6] accelerometer (m/s^2) + gyroscope (rad/s) samples of a slow walk."""
    t = np.arange(int(seconds * rate)) / rate
    step = 2 * np.pi * 1.8 * t
    acc = np.stack([0.8 * np.sin(step), 9.81 + 1.5 * np.sin(2 * step), 0.5 * np.cos(step)], axis=1)
    gyro = np.stack([0.3 * np.sin(step), 0.1 * np.cos(step), 0.2 * np.sin(2 * step)], axis=1)
    return np.concatenate([acc, gyro], axis=1).astype(np.float32)


def stop_button_demo(pipe: Pipeline, samples: np.ndarray):
    """Stream an answer and press "Stop" from another thread once the first chunk is shown.

    The Stop button stands for a UI thread: it is started by the first chunk (not by a
    timer, which could fire after the answer is over) and calls the stream's `cancel()`.
    The stream notices before its next token and ends with stop_reason "cancelled".
    """
    stream = pipe.ask("Describe the scene.", imu=samples, options={"rate": 100.0}, stream=True,
                      sampling=Sampling(temperature=0.8, top_p=1.0, max_new_tokens=200, seed=7))
    with stream:  # closes the stream if the loop body raises
        for i, chunk in enumerate(stream):
            print(chunk, end="", flush=True)
            if i == 0:
                button = threading.Thread(target=stream.cancel, name="stop-button")
                button.start()
                button.join()  # the click has landed; the next chunk request sees it
        print()
    return stream.answer


def main(bundle: str | None) -> int:
    with Pipeline.load(bundle, device="auto") as pipe:
        if pipe.random_weights:
            print("[demo bundle: random weights, the answers are meaningless]", file=sys.stderr)
        samples = fake_sensor_stream()

        # 1. one question, streamed; in-memory arrays go through the same validation as files
        print("Q: What is the person doing?\nA: ", end="", flush=True)
        for chunk in pipe.ask("What is the person doing?", imu=samples, options={"rate": 100.0},
                              stream=True, sampling=Sampling(max_new_tokens=48)):
            print(chunk, end="", flush=True)
        print()

        # 2. a conversation: the follow-up re-encodes nothing and prefills only the new turn
        chat = pipe.chat(imu=samples, options={"rate": 100.0})
        first = chat.ask("What is the person doing?", sampling=Sampling.greedy(24))
        second = chat.ask("Are they running?", sampling=Sampling.greedy(24))
        print(f"turn 1: first token after {first.timings['first_token_s'] * 1000:.1f} ms, "
              f"{first.timings['prefill_positions']:.0f} positions prefilled")
        print(f"turn 2: first token after {second.timings['first_token_s'] * 1000:.1f} ms, "
              f"{second.timings['prefill_positions']:.0f} positions prefilled")

        # 3. a Stop button: the UI thread cancels this request while its answer streams
        answer = stop_button_demo(pipe, samples)
        print(f"cancelled answer: {len(answer.token_ids)} tokens, {answer.text!r}, "
              f"stop reason {answer.stop_reason!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else None))
