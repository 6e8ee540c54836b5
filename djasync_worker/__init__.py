"""djasync-worker: the long-running daemon that runs djasync jobs in N child processes."""
