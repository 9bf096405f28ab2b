// A live stream to the service: a single-use ticket from POST /v1/streams (sent with the key),
// then WebSocket /v1/stream with the ticket as its first message (keys never go in a URL),
// 16-bit PCM out, a window's raw and smoothed answer back every hop.
import {ApiError, api} from "./api.js";

export class EmotionStream {
  /** onWindow({index, start, end, probabilities, raw, smoothed}); onClose(reason) when the
   * service ends the stream (a normal close by `close()` is not reported). */
  constructor({onWindow, onClose}) {
    this.onWindow = onWindow;
    this.onClose = onClose;
    this.pending = new Map(); // window index -> {resolve, reject} of a correction in flight
  }

  /** Open the stream for audio at `sampleRate`; resolves to the "ready" message. */
  async open(sampleRate, userId) {
    const json = userId ? {sample_rate: sampleRate, user_id: userId} : {sample_rate: sampleRate};
    const {token, socket_path: path} = await api("/v1/streams", {method: "POST", json});
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    this.socket = new WebSocket(`${scheme}://${location.host}${path}`);
    this.socket.binaryType = "arraybuffer";
    return new Promise((resolve, reject) => {
      this.socket.onopen = () => this.socket.send(JSON.stringify({token}));
      this.socket.onmessage = (event) => {
        const message = JSON.parse(event.data);
        if (message.type === "ready") resolve(message);
        else if (message.type === "window") this.onWindow(message);
        else this.settle(message);
      };
      this.socket.onclose = (event) => {
        const reason = event.reason || `the connection closed (${event.code})`;
        reject(new ApiError(0, "stream_closed", reason));
        for (const {reject: fail} of this.pending.values()) fail(new Error(reason));
        this.pending.clear();
        if (!this.closing) this.onClose(reason);
      };
    });
  }

  /** Float samples in [-1, 1] -> 16-bit little-endian PCM on the socket. */
  send(samples) {
    if (this.socket?.readyState !== WebSocket.OPEN) return;
    const pcm = new Int16Array(samples.length);
    for (let i = 0; i < samples.length; i++) {
      pcm[i] = Math.max(-32768, Math.min(32767, Math.round(samples[i] * 32767)));
    }
    this.socket.send(pcm.buffer);
  }

  /** Correct one window; resolves to the feedback id once the service stored it. */
  correct(index, label) {
    return new Promise((resolve, reject) => {
      this.pending.set(index, {resolve, reject});
      this.socket.send(JSON.stringify({type: "correct", index, label}));
    });
  }

  settle(message) {
    const waiting = this.pending.get(message.index);
    if (!waiting) return;
    this.pending.delete(message.index);
    if (message.type === "corrected") waiting.resolve(message.feedback_id);
    else waiting.reject(new ApiError(422, message.error, message.detail));
  }

  close() {
    this.closing = true;
    this.socket?.close(1000, "stopped");
  }
}
