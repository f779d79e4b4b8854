"""The TFLite runtime both sides share: loading an interpreter (LiteRT or tflite-runtime) and the Trainer."""
