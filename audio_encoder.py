"""Audio front end: Whisper log-mel features, Whisper-style encoders and the adapters that feed an LLM.

Data flow: waveform (16 kHz mono) -> log_mel -> (B, n_mels, frames) -> encoder -> (B, A_enc, D_enc)
-> adapter (pool + projector) -> (B, A, D) rows that model.LALM scatters into the audio placeholders.
"""
import math

# ---------------------------------------------------------------------------
# Audio and time constants: defined once, everything else derives from them.
SAMPLE_RATE = 16000                                   # Hz, every model here
N_FFT = 400                                           # samples, 25 ms window
HOP_LENGTH = 160                                      # samples, 10 ms hop
CHUNK_LENGTH = 30                                     # seconds, one Whisper window
N_SAMPLES = CHUNK_LENGTH * SAMPLE_RATE                # 480000 samples in one window
N_FRAMES = N_SAMPLES // HOP_LENGTH                    # 3000 mel frames in one window
FRAMES_PER_SECOND = SAMPLE_RATE // HOP_LENGTH         # 100 mel frames/s (10 ms each)
CONV_STRIDE = 2                                       # Whisper conv2 stride
ENCODER_TOKENS_PER_SECOND = FRAMES_PER_SECOND // CONV_STRIDE  # 50 encoder frames/s (20 ms each)
POOL_STRIDE = 2                                       # Qwen2-Audio / Omni avg-pool after the encoder
AUDIO_TOKENS_PER_SECOND = ENCODER_TOKENS_PER_SECOND // POOL_STRIDE  # 25 LLM audio tokens/s
SECONDS_PER_AUDIO_TOKEN = 1 / AUDIO_TOKENS_PER_SECOND  # 0.04 s of audio per LLM audio token


def num_mel_frames(n_samples: int) -> int:
    """Valid mel frames of a clip of n_samples (capped at one 30 s window), as the processors count them."""
    return min(math.ceil(n_samples / HOP_LENGTH), N_FRAMES)


def num_encoder_frames(n_frames: int) -> int:
    """Frames after conv2 (kernel 3, stride 2, padding 1)."""
    return (n_frames - 1) // CONV_STRIDE + 1


def num_audio_tokens(n_frames: int) -> int:
    """LLM audio tokens after conv2 and the stride-2 avg-pool (Qwen2-Audio, Omni per chunk); 1 frame -> 0."""
    return (num_encoder_frames(n_frames) - 2) // POOL_STRIDE + 1
