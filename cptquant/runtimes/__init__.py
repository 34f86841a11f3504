"""Runtime adapters: run exported models on ONNX Runtime execution providers and measure them.

- base.py: `RuntimeAdapter` (available / session / run / run_bound with IO binding) and timing helpers
- cpu.py, cuda.py: the CPU and CUDA execution providers
- quality.py: quality by task against the FP32/FP16 baselines on held-out text, from eval_text.py (the
  evaluation text and its tokens), lm_scores.py (causal-LM sliding windows: NLL, top-1, KL) and
  encoder_outputs.py (pooled embeddings, class logits, masked-LM predictions)
- speed.py: interleaved latency (encoders: batch x sequence; decoders: prefill and KV-cache decode)
- memory.py: peak host memory of one variant, in a fresh process
- verify.py: `cptq verify`'s engine (measure on each adapter, gate) and `short_verification`, the CPU
  figures `cptq-export` adds to its report; export_folder.py: the checks of an export folder and its
  baselines; gate.py: thresholds and checks; verify_reports.py: report.json/.md and JUnit XML
"""
