// Runs the same code an iPhone app would, from a Mac (macOS 15, Apple silicon):
//
//   swift run ondevice-lora-demo multi.mlpackage multi-tokenizer/ --adapter support "Hello"
//   swift run ondevice-lora-demo swappable.mlpackage swappable-tokenizer/ --adapter-file support.coreml-adapter.safetensors "Hello"
//   swift run ondevice-lora-demo swappable.mlpackage swappable-tokenizer/ --swappable "Hello"   (base: zero adapter inputs)
//
// A multifunction package without --adapter runs its plain base (prefill_base/decode_base).
import Foundation
import OndeviceLoRA

/// Positional arguments, and the values of --adapter and --adapter-file, and whether --swappable was given.
func parse(_ words: [String]) -> (positional: [String], values: [String: String], swappable: Bool) {
    var positional: [String] = []
    var values: [String: String] = [:]
    var swappable = false
    var i = 0
    while i < words.count {
        if words[i] == "--swappable" {
            swappable = true
        } else if words[i].hasPrefix("--"), i + 1 < words.count {
            values[words[i]] = words[i + 1]
            i += 1
        } else {
            positional.append(words[i])
        }
        i += 1
    }
    return (positional, values, swappable)
}

let (arguments, values, swappableFlag) = parse(Array(CommandLine.arguments.dropFirst()))
let adapterName = values["--adapter"]  // a multifunction package's adapter, as the export named it
let adapterFile = values["--adapter-file"]  // a downloaded adapter for a swappable package
let swappable = swappableFlag || adapterFile != nil
guard arguments.count == 3 else {
    print("usage: ondevice-lora-demo PACKAGE TOKENIZER_FOLDER [--adapter NAME | --adapter-file FILE | --swappable] PROMPT")
    exit(2)
}
let package = URL(fileURLWithPath: arguments[0])
let tokenizerFolder = URL(fileURLWithPath: arguments[1], isDirectory: true)

do {
    // An .mlmodelc is used as it is; an .mlpackage is compiled first (once, then reused).
    var compiled = package
    if package.pathExtension != "mlmodelc" { compiled = try await compiledModel(for: package) }
    let model: LanguageModel
    if swappable {
        model = try await LanguageModel(compiledModel: compiled, prefillFunction: "prefill", decodeFunction: "decode")
        if let adapterFile {
            let adapter = try AdapterFile(contentsOf: URL(fileURLWithPath: adapterFile))
            print("adapter rank \(adapter.manifest["rank"] ?? "?"), r_max \(adapter.manifest["r_max"] ?? "?")")
            model.extraInputs = try adapter.inputs(for: model)
        } else {
            model.extraInputs = try baseInputs(for: model)
        }
    } else {
        let suffix = adapterName ?? "base"
        model = try await LanguageModel(
            compiledModel: compiled, prefillFunction: "prefill_\(suffix)", decodeFunction: "decode_\(suffix)")
    }
    let chat = try await ChatSession(model: model, tokenizerFolder: tokenizerFolder)
    print(try chat.reply(to: arguments[2]))
} catch {
    print("error: \(error.localizedDescription)")
    exit(1)
}
