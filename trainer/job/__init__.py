"""The generic job: what trains any task and keeps its run directory, knowing no problem.

    train          the job's order of things: prepare, fit, finalize (and its `Task`)
    controller     the training loop: steps, calls, periodic actions, divergence
    outputs        what the job writes under --model_dir, and reads back
    run_directory  the names of the run directory's files and folders (no TensorFlow)
    checkpoints    reading checkpoints back whole, setting damaged ones aside
    lease          one job per run directory
    preemption     SIGTERM and Ctrl-C: save, then stop
    storage        writes through tf.io.gfile, a full disk as one line
    progress       the progress bar and line, and throughput
    distribution   --strategy and --precision to what TensorFlow runs
    tuning         a Vertex AI tuning trial's reports
"""
