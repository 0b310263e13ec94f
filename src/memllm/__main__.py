from memllm.cli import main

main()
