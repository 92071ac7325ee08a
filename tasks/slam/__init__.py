"""2D laser graph SLAM task: ICP front end, keyframe pose graph with loop closures."""
