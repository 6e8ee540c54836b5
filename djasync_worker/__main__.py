from djasync_worker.cli import main

main()
