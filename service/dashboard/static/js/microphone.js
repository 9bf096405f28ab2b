// The microphone as raw samples, and the overlapping windows the live view sends.

export const WINDOW_SECONDS = 3; // what each request holds, once that much was recorded
export const HOP_SECONDS = 1; // how often one is sent
export const FIRST_WINDOW_SECONDS = 1; // the first goes out after a second, not after three

const WORKLET_URL = "/dashboard/js/capture-worklet.js";
const MODEL_RATE = 16000;

export class Microphone {
  /** Start capturing; `onBlock(Float32Array)` gets mono samples. Resolves to the sample rate. */
  async start(onBlock) {
    if (!navigator.mediaDevices?.getUserMedia) {
      throw new Error("this browser offers no microphone here: open the dashboard on " +
                      "localhost or over https");
    }
    this.stream = await navigator.mediaDevices.getUserMedia({
      audio: {channelCount: 1, echoCancellation: false, noiseSuppression: false,
              autoGainControl: false},
    });
    const source = this.openContext();
    if (this.context.audioWorklet) {
      await this.context.audioWorklet.addModule(WORKLET_URL);
      this.node = new AudioWorkletNode(this.context, "pcm-capture");
      this.node.port.onmessage = (event) => onBlock(event.data);
    } else {
      // Browsers without AudioWorklet: the older ScriptProcessor, on the main thread.
      this.node = this.context.createScriptProcessor(2048, 1, 1);
      this.node.onaudioprocess = (event) =>
        onBlock(new Float32Array(event.inputBuffer.getChannelData(0)));
    }
    source.connect(this.node);
    // Its output is silence; connecting it is what makes every browser keep pulling audio through.
    this.node.connect(this.context.destination);
    if (this.context.state === "suspended") await this.context.resume();
    return this.context.sampleRate;
  }

  openContext() {
    // At 16 kHz the browser resamples for us, and each window is a third of the bytes. Some
    // browsers cannot connect a microphone to a context at another rate: then use the default.
    try {
      this.context = new AudioContext({sampleRate: MODEL_RATE});
      return this.context.createMediaStreamSource(this.stream);
    } catch {
      this.context?.close();
      this.context = new AudioContext();
      return this.context.createMediaStreamSource(this.stream);
    }
  }

  async stop() {
    for (const track of this.stream?.getTracks() ?? []) track.stop();
    if (this.node?.port) this.node.port.onmessage = null;
    await this.context?.close().catch(() => {});
    this.stream = this.context = this.node = null;
  }
}

/** Keeps the last WINDOW_SECONDS of samples; every HOP_SECONDS of new audio, hands out a copy. */
export class Windower {
  constructor(sampleRate) {
    this.rate = sampleRate;
    this.ring = new Float32Array(Math.round(WINDOW_SECONDS * sampleRate));
    this.hop = Math.round(HOP_SECONDS * sampleRate);
    this.total = 0; // samples seen since the start
    this.nextAt = Math.round(FIRST_WINDOW_SECONDS * sampleRate);
  }

  /** Add a block; returns a window {samples, start, end} (seconds) when one is due, else null. */
  push(block) {
    const size = this.ring.length;
    for (let offset = 0; offset < block.length;) {
      const at = this.total % size;
      const n = Math.min(block.length - offset, size - at);
      this.ring.set(block.subarray(offset, offset + n), at);
      this.total += n;
      offset += n;
    }
    if (this.total < this.nextAt) return null;
    while (this.nextAt <= this.total) this.nextAt += this.hop;
    return {samples: this.latest(), rate: this.rate,
            start: Math.max(0, this.total - size) / this.rate, end: this.total / this.rate};
  }

  latest() {
    const size = this.ring.length;
    const length = Math.min(this.total, size);
    const out = new Float32Array(length);
    const end = this.total % size;
    if (length < size || end === 0) {
      out.set(this.ring.subarray(end === 0 ? size - length : end - length, end || size));
    } else {
      out.set(this.ring.subarray(end), 0);
      out.set(this.ring.subarray(0, end), size - end);
    }
    return out;
  }
}

/** The level of a block, 0..1, for the input meter. */
export function level(block) {
  let sum = 0;
  for (const x of block) sum += x * x;
  return Math.min(1, Math.sqrt(sum / Math.max(1, block.length)) * 4);
}
