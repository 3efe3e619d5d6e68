# The embedding examples (examples/README.md), built with the library so they cannot rot.
# Included from core/CMakeLists.txt.
foreach(example embed_callbacks embed_poll)
  add_executable(example_${example} ${CMAKE_SOURCE_DIR}/examples/${example}.c)
  target_link_libraries(example_${example} PRIVATE pushlet Threads::Threads)
endforeach()
