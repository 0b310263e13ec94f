from memllm.train.trainer import main

main()
