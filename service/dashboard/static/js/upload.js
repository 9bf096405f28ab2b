// The upload view: drop or pick a file, hear it back, see the same result as live.
import {predict} from "./api.js";
import {$} from "./dom.js";
import {userId} from "./keys.js";
import {ResultView} from "./result.js";

export function initUpload() {
  const input = $("#upload-input");
  const zone = $("#dropzone");
  const result = new ResultView($("#upload-result"));
  let objectUrl = null;

  async function classify(file) {
    $("#upload-file").hidden = false;
    $("#upload-file-name").textContent = `${file.name} · ${(file.size / 1024).toFixed(0)} KB`;
    if (objectUrl) URL.revokeObjectURL(objectUrl);
    objectUrl = URL.createObjectURL(file);
    $("#upload-audio").src = objectUrl;
    result.clear("Classifying…");
    try {
      await result.show(await predict(file, file.name, userId()), file.name);
    } catch (err) {
      result.fail(`Not classified: ${err.message}`);
    }
  }

  input.addEventListener("change", () => {
    if (input.files.length) classify(input.files[0]);
  });
  zone.addEventListener("dragover", (event) => {
    event.preventDefault();
    zone.classList.add("dragging");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("dragging");
    const file = event.dataTransfer.files[0];
    if (file) classify(file);
  });
}
