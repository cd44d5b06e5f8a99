"""embed: the slim package shared by the four pipeline scripts (generate, mine, train, evaluate)."""
