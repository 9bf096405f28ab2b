"""The frozen pretrained speech encoder under the CNN-BiLSTM: the first blocks of Whisper's
encoder (MIT-licensed weights, imported once by a maintainer from a CTranslate2 file and
bundled as safetensors), fed by Whisper's own log-mel."""
