// The microphone as raw samples, for the live view's stream.

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

/** The level of a block, 0..1, for the input meter. */
export function level(block) {
  let sum = 0;
  for (const x of block) sum += x * x;
  return Math.min(1, Math.sqrt(sum / Math.max(1, block.length)) * 4);
}
